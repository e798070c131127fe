"""In the browser: an SMT saliency mask for a gallery digit on the FC sample model.

Oracle: the ONNX file's own first-layer weights (numpy) re-check, for the mask the page
reports, that every selected neuron stays at or above the threshold.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytestmark = pytest.mark.browser


def _first_layer(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(W [out, in], b)`` of the model's first Gemm, read from the file itself."""
    graph = onnx.load(str(path)).graph
    node = next(n for n in graph.node if n.op_type == "Gemm")
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in graph.initializer}
    trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
    w = inits[node.input[1]] if trans_b else inits[node.input[1]].T
    return w, inits[node.input[2]]


def test_saliency_in_browser(ui, atlas) -> None:
    model_path, _ = ui.open_sample("saliency", "digits_fc_standard", input="gallery:digits:0")
    page = ui.page
    ui.click_run("saliency")
    page.get_by_text("Grading at the same number of kept features").wait_for(timeout=120_000)
    ui.wait_idle()

    job_id = ui.query_params()["job"]
    with atlas.api() as api:
        assert api.get(f"/jobs/{job_id}").json()["analysis"] == "saliency"
        result = api.get(f"/jobs/{job_id}/result").json()
    assert result["status"] == "optimal"
    page.get_by_text(f"{result['mask_size']} of 64").wait_for()
    assert page.get_by_text(re.compile(r"^optimal$")).count() >= 1

    w, b = _first_layer(model_path)
    x = np.asarray(result["input"], dtype=np.float64).reshape(-1)
    mask = np.asarray(result["mask"], dtype=np.float64).reshape(-1)
    idx = [n["index"] for n in result["neurons"]]
    orig, masked = w @ x + b, w @ (x * mask) + b
    assert np.all(masked[idx] >= result["threshold"] * orig[idx] - 1e-5)
    page.locator(".js-plotly-plot").first.wait_for()
    ui.screenshot("saliency")
