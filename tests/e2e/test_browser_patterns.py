"""In the browser: mine and verify pattern rules on an IBP-trained sample model.

Oracle: onnxruntime on the model file for the decision the page reports for the input, and
the job's JSON from the API for the rule counts shown.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_MODEL = ROOT / "sample_models" / "digits_fc_ibp.onnx"

pytestmark = pytest.mark.browser


def test_patterns_in_browser(ui, atlas) -> None:
    if not SAMPLE_MODEL.exists():
        pytest.skip("sample models not built")
    page = ui.page
    model_bytes = SAMPLE_MODEL.read_bytes()
    model_id = hashlib.sha256(model_bytes).hexdigest()
    ui.open("patterns", model=model_id, input="gallery:digits:0")
    ui.wait_idle()
    page.get_by_role("button", name="Run").first.click()
    heading = page.get_by_text(re.compile(r"^\d+ rules at L\d+, \d+ proven$"))
    heading.wait_for(timeout=240_000)
    ui.wait_idle()

    job_id = ui.query_params()["job"]
    with atlas.api() as api:
        assert api.get(f"/jobs/{job_id}").json()["analysis"] == "patterns"
        result = api.get(f"/jobs/{job_id}/result").json()
        served = api.get(f"/models/{model_id}/inputs/gallery:digits:0").json()
    proven = sum(r["status"] == "proven" for r in result["rules"])
    assert heading.inner_text() == f"{len(result['rules'])} rules at L{result['layer']}, {proven} proven"
    assert proven >= 1
    x = np.asarray(served["values"], dtype=np.float32).reshape(1, *served["shape"])
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0].reshape(-1)
    page.get_by_text(f"Decision: class {int(np.argmax(logits))}.").wait_for()
    assert result["current"]["decision"] == int(np.argmax(logits))
    page.get_by_text(result["rules"][0]["text"]).first.wait_for()
    page.locator(".js-plotly-plot").first.wait_for()
    ui.screenshot("patterns")
