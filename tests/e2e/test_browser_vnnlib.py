"""In the browser: the proof page's VNN-LIB panel verifies an uploaded property.

The test writes two properties from a gallery digit and onnxruntime's decision on the model
file: "some other class reaches the predicted one" on a tiny ball (the verifier must not find
a counterexample there: onnxruntime says every sampled point keeps the class) and on a large
ball (a counterexample, which onnxruntime must confirm violates the class).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

pytestmark = pytest.mark.browser


def _property(x: np.ndarray, target: int, n_out: int, eps: float) -> str:
    lines = [f"(declare-const X_{i} Real)" for i in range(x.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_out)]
    for i, v in enumerate(x):
        lines += [f"(assert (>= X_{i} {max(0.0, float(v) - eps)!r}))",
                  f"(assert (<= X_{i} {min(1.0, float(v) + eps)!r}))"]
    rivals = " ".join(f"(and (>= Y_{j} Y_{target}))" for j in range(n_out) if j != target)
    return "\n".join([*lines, f"(assert (or {rivals}))"])


def test_vnnlib_panel_verdicts(ui, atlas) -> None:
    model_path, model_id = ui.open_sample("proof_features", "digits_fc_standard",
                                          input="gallery:digits:0")
    page = ui.page
    with atlas.api() as api:
        served = api.get(f"/models/{model_id}/inputs/gallery:digits:0").json()
    x = np.asarray(served["values"], dtype=np.float64).reshape(-1)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def logits(points: np.ndarray) -> np.ndarray:
        feed = points.astype(np.float32).reshape(-1, *served["shape"])
        return np.vstack([session.run(None, {session.get_inputs()[0].name: p[None]})[0]
                          for p in feed])

    out = logits(x[None])[0]
    target, n_out = int(out.argmax()), out.size
    uploader = page.get_by_test_id("stFileUploader").filter(has_text="VNN-LIB file")
    last_job = None
    for eps, expect in ((0.001, "proven"), (0.5, "counterexample")):
        text = _property(x, target, n_out, eps)
        uploader.locator("input[type='file']").set_input_files(
            {"name": f"ball_{eps}.vnnlib", "mimeType": "text/plain", "buffer": text.encode()})
        uploader.get_by_text(f"ball_{eps}.vnnlib").wait_for()  # the page has the new file
        ui.wait_idle()
        ui.click_run("verify_property")
        page.wait_for_function(  # a new job, not the last file's
            "last => new URLSearchParams(location.search).get('job.verify_property') !== last",
            arg=last_job, timeout=60_000)
        verdict = page.locator("[data-testid='stMetric']").filter(has_text="Verdict")
        verdict.filter(has_text=expect).wait_for(timeout=120_000)
        ui.wait_idle()
        job_id = last_job = ui.query_params()["job.verify_property"]
        with atlas.api() as api:
            result = api.get(f"/jobs/{job_id}/result").json()
        assert result["status"] == expect
        lo, hi = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
        if expect == "proven":
            rng = np.random.default_rng(0)
            samples = rng.uniform(lo, hi, (300, x.size))
            assert (logits(samples).argmax(1) == target).all()
        else:
            point = np.asarray(result["counterexample"], np.float64).reshape(-1)
            assert np.all(point >= lo - 1e-9) and np.all(point <= hi + 1e-9)
            y = logits(point[None])[0]
            assert np.delete(y, target).max() >= y[target] - 1e-4
            page.locator(".js-plotly-plot").last.wait_for()
        ui.screenshot(f"vnnlib_{expect}")
