"""In the browser: prove a gallery digit robust on a PGD-trained sample model and read the proof.

Oracle: onnxruntime on the model file for the class the page says is proven, and the job's
JSON from the API for the feature counts shown.
"""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest

pytestmark = pytest.mark.browser


def test_proof_features_in_browser(ui, atlas) -> None:
    model_path, model_id = ui.open_sample("proof_features", "digits_conv_pgd",
                                          input="gallery:digits:0")
    page = ui.page
    ui.click_run("proof_features")
    heading = page.get_by_text(re.compile(r"^(Not certified|Certified): class"))
    heading.wait_for(timeout=120_000)
    ui.wait_idle()
    shown = re.search(r"class (\d+) at eps 0\.050 \(crown\)", heading.inner_text())
    assert shown and heading.inner_text().startswith("Certified")

    job_id = ui.query_params()["job"]
    with atlas.api() as api:
        assert api.get(f"/jobs/{job_id}").json()["analysis"] == "proof_features"
        result = api.get(f"/jobs/{job_id}/result").json()
        served = api.get(f"/models/{model_id}/inputs/gallery:digits:0").json()
    x = np.asarray(served["values"], dtype=np.float32).reshape(1, *served["shape"])
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0].reshape(-1)
    assert int(shown.group(1)) == int(np.argmax(logits)) == result["predicted"]
    assert result["sufficient"] and 0 < result["num_kept"] <= result["num_nonzero"]
    page.get_by_text(f"{result['num_nonzero']} / {result['num_features']}").wait_for()
    page.locator(".js-plotly-plot").first.wait_for()
    ui.screenshot("proof_features")


def test_largest_eps_with_alpha_crown_in_browser(ui, atlas) -> None:
    """alpha-CROWN added to the bisection's methods from the page: the job gets it, and
    random points of its certified ball all keep the class under onnxruntime."""
    model_path, model_id = ui.open_sample("proof_features", "digits_fc_ibp",
                                          input="gallery:digits:1")
    page = ui.page
    box = page.get_by_test_id("stMultiSelect").filter(has_text="Methods")
    box.locator("input").click()
    page.get_by_role("option", name="alpha-crown").click()
    page.keyboard.press("Escape")
    ui.wait_idle()
    ui.click_run("proof_eps")
    page.wait_for_function("() => new URLSearchParams(location.search).has('job.proof_eps')")
    job_id = ui.query_params()["job.proof_eps"]
    with atlas.api() as api:
        job = api.get(f"/jobs/{job_id}").json()
        while job["status"] in ("queued", "running"):
            page.wait_for_timeout(300)
            job = api.get(f"/jobs/{job_id}").json()
        result = api.get(f"/jobs/{job_id}/result").json()
        served = api.get(f"/models/{model_id}/inputs/gallery:digits:1").json()
    assert job["params"]["methods"] == ["interval", "deepz", "crown", "alpha-crown"]
    found = result["largest_eps"]
    assert found["alpha-crown"] >= found["crown"] - result["tol"]
    x = np.asarray(served["values"], dtype=np.float64).reshape(-1)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    eps = found["alpha-crown"]
    lo, hi = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
    points = np.vstack([rng.uniform(lo, hi, (200, x.size)),
                        lo + (hi - lo) * rng.integers(0, 2, (200, x.size))])
    logits = session.run(None, {session.get_inputs()[0].name:
                                points.astype(np.float32).reshape(-1, *served["shape"])})[0]
    assert (logits.argmax(1) == result["predicted"]).all()
    page.get_by_text("alpha-crown").first.wait_for()
    page.locator(".js-plotly-plot").first.wait_for()
    ui.screenshot("proof_largest_eps_alpha")
