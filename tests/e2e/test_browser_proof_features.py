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
