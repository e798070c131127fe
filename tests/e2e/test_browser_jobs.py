"""In the browser: the Jobs page names each job's model and parameters, and its "Open" link
shows the job's own model, input and result even when the sidebar has another model.

Oracle: the API's record of the job (its model, input and parameters) and of the models.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.e2e.conftest import sample_model

pytestmark = pytest.mark.browser


def test_open_shows_the_jobs_own_model_and_result(ui, atlas) -> None:
    _, job_model = sample_model("digits_fc_pgd")
    _, sidebar_model = sample_model("digits_conv_standard")
    with atlas.api() as api:
        job = api.post("/jobs", json={"analysis": "predict", "model_id": job_model,
                                      "input_id": "gallery:digits:4"}).json()
        deadline = time.monotonic() + 120
        while api.get(f"/jobs/{job['id']}").json()["status"] != "finished":
            assert time.monotonic() < deadline, "the predict job did not finish"
            time.sleep(0.3)
        names = {m["id"]: m["name"] for m in api.get("/models").json()}
    ui.open("jobs", model=sidebar_model)
    row = ui.page.locator(f".st-key-job_{job['id']}")
    row.get_by_text(names[job_model]).wait_for()  # the model's name, not its hash
    row.get_by_text(re.compile(r"input_id|gallery:digits:4")).first.wait_for()
    ui.screenshot("jobs_page")
    row.get_by_role("link", name=re.compile("Open")).click()
    ui.page.wait_for_function(
        f"() => new URLSearchParams(location.search).get('model') === '{job_model}'")
    ui.wait_idle()
    ui.page.get_by_text(re.compile(rf"Job {job['id'][:8]} finished")).wait_for(timeout=60_000)
    params = ui.query_params()
    assert params["model"] == job_model and params["job"] == job["id"]
    assert params["input"] == "gallery:digits:4"
    ui.screenshot("jobs_open_other_model")
