"""In the browser: recover a sample model's weights as a black box and read the grading.

Oracle: the job's JSON from the API for the figures shown, and the sample model's true
first-layer weights (read from the ONNX file with onnx's numpy helper) for the neuron count.
"""

from __future__ import annotations

import re

import onnx
import pytest
from onnx import numpy_helper

pytestmark = pytest.mark.browser


def test_extraction_in_browser(ui, atlas) -> None:
    model_path, _ = ui.open_sample("extraction", "digits_fc_standard")
    page = ui.page
    page.get_by_label("Query budget").fill("60000")
    page.get_by_label("Query budget").press("Enter")
    ui.wait_idle()
    page.get_by_role("button", name="Run").click()
    summary = page.get_by_text(re.compile(r"Recovered hidden layers"))
    summary.wait_for(timeout=240_000)
    ui.wait_idle()
    page.get_by_text("Grading against the true weights").wait_for()
    shown = int(re.search(r"layers: (\d+)", summary.inner_text()).group(1))

    weights = [numpy_helper.to_array(t) for t in onnx.load(model_path).graph.initializer]
    first_layer_neurons = max(w.shape[0] for w in weights if w.ndim == 2 and 64 in w.shape)
    assert 0 < shown <= first_layer_neurons
    job_id = ui.query_params()["job"]
    with atlas.api() as api:
        result = api.get(f"/jobs/{job_id}/result").json()
    assert result["layer_sizes"][0] == shown and result["queries"] <= 60_000
    ui.screenshot("browser_extraction")
    charts = page.locator(".js-plotly-plot")
    charts.nth(1).wait_for()
    assert charts.count() == 2  # neurons vs queries, and true vs recovered weights (8x8 images)
