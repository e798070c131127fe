"""In the browser: mine and verify pattern rules on an IBP-trained sample model.

Oracle: onnxruntime on the model file for the decision the page reports for the input, and
the job's JSON from the API for the rule counts shown.
"""

from __future__ import annotations

import io
import re
from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest

from tests.e2e.conftest import SAMPLE_MODELS

pytestmark = pytest.mark.browser


def _run_patterns(ui, atlas) -> tuple:
    """Press Run, wait for the rules' heading; ``(heading, job, result)`` from the API."""
    ui.click_run("patterns")
    heading = ui.page.get_by_text(re.compile(r"^\d+ rules at L\d+, \d+ proven$"))
    heading.wait_for(timeout=240_000)
    ui.wait_idle()
    with atlas.api() as api:
        job = api.get(f"/jobs/{ui.query_params()['job']}").json()
        result = api.get(f"/jobs/{job['id']}/result").json()
    return heading, job, result


def test_patterns_in_browser(ui, atlas) -> None:
    model_path, model_id = ui.open_sample("patterns", "digits_fc_ibp", input="gallery:digits:0")
    page = ui.page
    heading, job, result = _run_patterns(ui, atlas)
    assert job["analysis"] == "patterns"
    with atlas.api() as api:
        served = api.get(f"/models/{model_id}/inputs/gallery:digits:0").json()
    proven = sum(r["status"] == "proven" for r in result["rules"])
    assert heading.inner_text() == f"{len(result['rules'])} rules at L{result['layer']}, {proven} proven"
    assert proven >= 1
    x = np.asarray(served["values"], dtype=np.float32).reshape(1, *served["shape"])
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0].reshape(-1)
    page.get_by_text(f"Decision: class {int(np.argmax(logits))}.").wait_for()
    assert result["current"]["decision"] == int(np.argmax(logits))
    page.get_by_text(result["rules"][0]["text"]).first.wait_for()
    page.locator(".js-plotly-plot >> visible=true").first.wait_for()  # not the folded ones
    ui.screenshot("patterns")

    # verify every rule in parallel: the table's status column must match the batch's result
    page.get_by_role("button", name="Verify all rules in parallel").click()
    page.get_by_text(re.compile(r"^Verified in parallel: ")).wait_for(timeout=300_000)
    ui.wait_idle()
    with atlas.api() as api:
        batch = next(b for b in api.get("/batches").json() if b["analysis"] == "patterns_verify")
        assert batch["status"] == "finished"
        items = api.get(f"/batches/{batch['id']}/result").json()["items"]
    assert len(items) == sum(bool(r["covered"]) for r in result["rules"])
    covered = iter(items)
    expected = [next(covered)["result"]["status"] if r["covered"] else r["status"]
                for r in result["rules"]]
    assert set(expected) <= {"proven", "counterexample", "unknown", "not verified"}
    # st.dataframe draws its cells on a canvas: compare the rendered status tally instead
    line = page.get_by_text(re.compile(r"^Verified in parallel: ")).inner_text()
    shown = {}
    for part in line.removeprefix("Verified in parallel: ").split(", "):
        n, status = part.split(" ", 1)
        shown[status] = int(n)
    assert shown == dict(Counter(expected))
    ui.screenshot("patterns_verified")


def test_patterns_mined_from_an_uploaded_dataset(ui, atlas) -> None:
    ui.open_sample("patterns", "digits_fc_ibp", input="gallery:digits:0")
    page = ui.page
    with np.load(SAMPLE_MODELS / "gallery" / "digits.npz") as gallery:
        x = gallery["x"][::-1][:120].astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, x=x)
    page.get_by_text("uploaded file").click()
    uploader = page.get_by_test_id("stFileUploader").filter(has_text="Dataset file")
    uploader.locator("input[type='file']").set_input_files(
        {"name": "mine.npz", "mimeType": "application/octet-stream", "buffer": buf.getvalue()})
    page.get_by_text("120 inputs of shape (1, 8, 8)").wait_for(timeout=60_000)
    _, job, result = _run_patterns(ui, atlas)
    assert job["params"]["dataset_id"] == result["source"]
    assert result["num_inputs"] == 120 and result["source"].startswith("dataset:")
    ui.screenshot("patterns_dataset")


@pytest.mark.slow
def test_refuted_rule_shows_what_can_be_proven(ui, atlas) -> None:
    """On the whole pixel box: proven coverage, the size/fidelity trade-off, and for a refuted
    rule its counterexample (class checked with onnxruntime), its refinement and the input
    properties of inputs it covers, as the job's JSON has them."""
    model_path, _ = ui.open_sample("patterns", "digits_fc_ibp", input="gallery:digits:0")
    page = ui.page
    page.get_by_test_id("stRadio").filter(has_text="Domain").get_by_text(
        "box", exact=True).click()
    ui.wait_idle()
    slider = page.get_by_test_id("stSlider").filter(has_text="Seconds per rule")
    slider.get_by_role("slider").press("Home")  # 2 s per rule
    ui.wait_idle()
    rules_slider = page.get_by_test_id("stSlider").filter(has_text="Rules to verify")
    for _ in range(3):  # 5 -> 2 rules
        rules_slider.get_by_role("slider").press("ArrowLeft")
        ui.wait_idle()
    _, job, result = _run_patterns(ui, atlas)
    assert job["params"]["domain"] == "box" and job["params"]["timeout"] == 2.0
    assert job["params"]["verify"] == 2

    coverage = result["proven_coverage"]
    metric = page.get_by_test_id("stMetric").filter(has_text="Proven coverage")
    assert metric.get_by_test_id("stMetricValue").inner_text() == f"{coverage['fraction']:.1%}"
    page.get_by_text(f"{coverage['covered']} of {coverage['checked']} held-out inputs have a "
                     "proven reason").wait_for()

    page.get_by_text("Rule-list size vs fidelity", exact=True).click()
    page.get_by_test_id("stExpander").filter(has_text="Rule-list size vs fidelity").locator(
        ".js-plotly-plot").wait_for()

    rules = result["rules"]
    chosen = next(i for i, r in enumerate(rules) if r["status"] == "counterexample")
    rule = rules[chosen]
    if chosen:
        page.get_by_test_id("stSelectbox").filter(has_text="Rule").click()
        page.get_by_role("option", name=f"{chosen}: {rule['text']}").click()
        ui.wait_idle()
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    ce = np.asarray(rule["counterexample"], dtype=np.float32).reshape(1, 1, 8, 8)
    shown_class = int(np.argmax(session.run(None, {session.get_inputs()[0].name: ce})[0]))
    assert shown_class == rule["counterexample_class"] != rule["target"]
    page.get_by_text(f"gets class {shown_class} instead of {rule['target']}").wait_for()
    refined = rule["refined"]
    page.get_by_text(f"more literals: {refined['text']}").wait_for()
    props = rule["properties"]
    proven = sum(p["status"] == "proven" or (p["ball"] or {}).get("status") == "proven"
                 for p in props)
    page.get_by_text(f"Input properties of {len(props)} inputs the rule covers").wait_for()
    assert f"{proven} proven to imply class {rule['target']}" in page.get_by_text(
        f"Input properties of {len(props)} inputs").inner_text()
    ui.screenshot("patterns_refuted_rule")
