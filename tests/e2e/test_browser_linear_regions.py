"""In the browser: every view of the linear-regions page on a sample model's input.

Oracles: the numbers the page shows are the jobs' results from the API; the line's logits at
its start and the exact IG's completeness (attributions sum to F(x) - F(0)) are checked
against an independent onnxruntime run on the model file; the plane's polygons tile the
parallelogram (shoelace areas sum to 1); the robustness chart names every sibling model.
"""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest

pytestmark = pytest.mark.browser


def test_linear_regions_in_browser(ui, atlas) -> None:
    model_path, model_id = ui.open_sample("linear_regions", "digits_fc_pgd",
                                          input="gallery:digits:3")
    page = ui.page
    ui.click_run("lr_line")
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
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    ref = sess.run(None, {name: x.reshape(1, 1, 8, 8).astype(np.float32)})[0][0]
    assert np.allclose(line["logits"][0], ref, atol=1e-4)
    charts = page.locator(".js-plotly-plot")
    charts.nth(1).wait_for()
    assert charts.count() == 2  # logits with class strip, tangent gap

    # plane: region map with its counts
    page.get_by_role("tab", name="In a plane").click()
    ui.click_run("lr_plane")
    regions = page.get_by_test_id("stMetric").filter(has_text="Linear regions")
    regions.wait_for(timeout=180_000)
    ui.wait_idle()
    with atlas.api() as api:
        plane = api.get(f"/jobs/{ui.query_params()['job.lr_plane']}/result").json()
    assert _metric(regions) == plane["num_regions"] >= 1
    areas = [0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], -1)) - np.dot(p[:, 1], np.roll(p[:, 0], -1)))
             for p in map(np.asarray, plane["polygons"])]
    assert abs(sum(areas) - 1.0) < 1e-9
    ui.screenshot("linear_regions_plane")

    # exact IG next to Captum's
    page.get_by_role("tab", name="Exact IG").click()
    ui.click_run("lr_ig")
    page.get_by_text(re.compile(r"Exact IG for class")).wait_for(timeout=180_000)
    ui.wait_idle()
    with atlas.api() as api:
        ig = api.get(f"/jobs/{ui.query_params()['job.lr_ig']}/result").json()
    zero = sess.run(None, {name: np.zeros((1, 1, 8, 8), np.float32)})[0][0]
    assert abs(np.sum(ig["exact"]) - (ref[ig["target"]] - zero[ig["target"]])) < 1e-4
    assert page.get_by_text(f"{ig['num_pieces']}", exact=True).count() >= 1
    ui.screenshot("linear_regions_ig")

    # robust vs standard: one line job per sibling model, densities side by side
    page.get_by_role("tab", name="Robust vs standard").click()
    page.get_by_role("button", name="Compare models").click()
    page.get_by_text("Robust vs standard: density for the same input").wait_for(timeout=180_000)
    ui.wait_idle()
    chart = page.get_by_test_id("stPlotlyChart").filter(has_text="pieces per unit length")
    for sibling in ("digits_fc_standard", "digits_fc_pgd", "digits_fc_ibp"):
        assert chart.get_by_text(sibling).count() >= 1
    ui.screenshot("linear_regions_robust")


def _metric(metric) -> int:
    return int(re.search(r"(\d+)\s*$", metric.inner_text().strip()).group(1))
