"""In the browser: compare the three fc sample models on one digit, export the HTML report.

Oracles: onnxruntime on each model file for the predictions the page shows; the report, opened
in the same browser from disk, must draw every figure the page drew (plotly.js inline).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.e2e.conftest import ARTIFACTS, sample_model

MODELS = [f"digits_fc_{m}" for m in ("standard", "pgd", "ibp")]
INPUT = "gallery:digits:3"

pytestmark = pytest.mark.browser


def test_compare_one_input_and_report(ui, atlas, browser, tmp_path: Path) -> None:
    paths = [sample_model(name)[0] for name in MODELS]
    _, anchor = ui.open_sample("compare", MODELS[1], input=INPUT)
    page = ui.page
    page.get_by_role("button", name="Compare").click()
    report_button = page.get_by_role("button", name="HTML report")
    report_button.wait_for(timeout=180_000)
    ui.wait_idle()

    with atlas.api() as api:
        served = api.get(f"/models/{anchor}/inputs/{INPUT}").json()
    x = np.asarray(served["values"], dtype=np.float32).reshape(1, *served["shape"])
    expected = []
    for path in paths:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        expected.append(int(np.argmax(session.run(None, {session.get_inputs()[0].name: x})[0])))
    shown = page.get_by_test_id("stMetric").filter(has_text="Prediction")
    assert shown.count() == len(MODELS)
    values = sorted(int(shown.nth(k).get_by_test_id("stMetricValue").inner_text())
                    for k in range(len(MODELS)))
    assert values == sorted(expected)
    # proven coverage, once per model: the values of the patterns_coverage batch's cells
    with atlas.api() as api:
        batch = next(b for b in api.get("/batches").json()
                     if b["analysis"] == "patterns_coverage")
        items = api.get(f"/batches/{batch['id']}/result").json()["items"]
    assert len(items) == len(MODELS) and all(i["input_id"] is None for i in items)
    fractions = [i["result"]["proven_coverage"]["fraction"] for i in items]
    covered = page.get_by_test_id("stMetric").filter(has_text="Proven coverage")
    assert covered.count() == len(MODELS)
    assert sorted(covered.nth(k).get_by_test_id("stMetricValue").inner_text()
                  for k in range(len(MODELS))) == sorted(f"{f:.0%}" for f in fractions)
    page.locator(".js-plotly-plot").nth(5).wait_for()
    drawn = page.locator(".js-plotly-plot").count()
    ui.screenshot("compare_one_input")
    assert drawn == 6
    query = ui.query_params()
    assert query["run"] == "1" and len(query["models"].split(",")) == len(MODELS)
    ui.screenshot("compare_one_input")

    with page.expect_download() as download:
        report_button.click()
    report = tmp_path / "report.html"
    download.value.save_as(report)
    text = report.read_text()
    assert "<script src=" not in text
    viewer = browser.new_page()
    try:
        viewer.goto(report.as_uri())
        viewer.locator(".js-plotly-plot").nth(drawn - 1).wait_for(timeout=30_000)
        assert viewer.locator(".js-plotly-plot").count() == drawn
        names = viewer.locator("section[data-figure]").evaluate_all(
            "els => els.map(e => e.dataset.figure)")
        assert names == ["compare_prediction", "compare_proof_features", "compare_largest_eps",
                         "compare_saliency", "compare_region_density",
                         "compare_proven_coverage"]
        assert re.search(r"digits_fc_ibp", viewer.content())
        viewer.screenshot(path=str(ARTIFACTS / "compare_report.png"), full_page=True)
    finally:
        viewer.close()

    # the link reopens the same comparison (its cells come from the job cache)
    ui.open("compare", **query)
    page.get_by_role("button", name="HTML report").wait_for(timeout=120_000)
    assert page.get_by_test_id("stMetric").filter(has_text="Prediction").count() == len(MODELS)
