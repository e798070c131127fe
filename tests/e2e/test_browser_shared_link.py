"""In the browser: a page with two job widgets keeps both jobs in its URL, so its link reopens both.

Oracle: the API's own record of the jobs (their ids, analyses and results), and its job list,
which must not grow when the link is reopened (the results come back, nothing reruns).
"""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import sample_model

MODEL = "digits_fc_pgd"
INPUT = "gallery:digits:0"

pytestmark = pytest.mark.browser


def _finished(ui, job_id: str, timeout_ms: int = 180_000) -> None:
    """Wait for a widget's "Job `<id>` finished" caption."""
    ui.page.get_by_text(re.compile(rf"Job {job_id[:8]} finished")).wait_for(timeout=timeout_ms)
    ui.wait_idle()


def test_two_jobs_reopen_from_one_link(ui, atlas) -> None:
    ui.open_sample("proof_features", MODEL, input=INPUT)
    page = ui.page

    ui.click_run("proof_features")  # the page's primary widget, in ?job=
    page.wait_for_function("() => new URLSearchParams(location.search).has('job')")
    proof_id = ui.query_params()["job"]
    _finished(ui, proof_id)
    ui.click_run("proof_eps")  # largest certified eps, in ?job.proof_eps=
    page.wait_for_function("() => new URLSearchParams(location.search).has('job.proof_eps')")
    params = ui.query_params()
    eps_id = params["job.proof_eps"]
    _finished(ui, eps_id)
    assert params["job"] == proof_id  # the second run kept the first job in the URL

    with atlas.api() as api:
        jobs = {j["id"]: j for j in api.get("/jobs").json()}
        proof = api.get(f"/jobs/{proof_id}/result").json()
    assert (jobs[proof_id]["analysis"], jobs[eps_id]["analysis"]) == ("proof_features",
                                                                      "proof_eps")
    assert {jobs[proof_id]["status"], jobs[eps_id]["status"]} == {"finished"}

    shared = type(ui)(page.context.new_page(), atlas)  # a new tab is a new Streamlit session
    shared.page.goto(page.url)
    shared.wait_idle()
    _finished(shared, proof_id, timeout_ms=60_000)
    _finished(shared, eps_id, timeout_ms=60_000)
    verdict = "Certified" if proof["certified"] else "Not certified"
    shared.page.get_by_text(re.compile(
        rf"^{verdict}: class {proof['predicted']} at eps {proof['eps']:.3f}")).wait_for()
    shared.page.locator(".gtitle", has_text="Largest certified eps").wait_for()
    assert shared.query_params() == params
    shared.screenshot("shared_link_two_jobs")
    with atlas.api() as api:
        assert len(api.get("/jobs").json()) == len(jobs)  # reopened, not rerun
    shared.page.close()


def test_jobs_page_polls_only_while_a_job_runs(ui, atlas) -> None:
    """The Jobs page asks the app for no reruns while idle, and for some while a job runs.

    Oracle: the messages the browser sends Streamlit (every fragment rerun is one) and the
    API's job status.
    """
    _, model_id = sample_model("digits_conv_ibp")  # its proofs take seconds, not one
    page = ui.page
    sent: list[object] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda frame: sent.append(frame)))

    def sent_during(ms: int) -> int:
        before = len(sent)
        page.wait_for_timeout(ms)
        return len(sent) - before

    ui.open("jobs", model=model_id)
    page.get_by_text(re.compile(r"^0 running or queued")).wait_for()
    assert sent_during(3000) == 0

    with atlas.api() as api:  # a gallery-wide proof comparison, cancelled below
        job = api.post("/jobs", json={"analysis": "proof_compare", "model_id": model_id,
                                      "input_id": None,
                                      "params": {"eps": 0.0123, "n_inputs": 200}}).json()
        page.get_by_role("button", name="Refresh").click()
        page.get_by_text(re.compile(r"^1 running or queued")).wait_for()
        assert sent_during(1500) > 0  # the page polls every second
        assert api.get(f"/jobs/{job['id']}").json()["status"] in ("queued", "running")
        api.post(f"/jobs/{job['id']}/cancel")
    page.locator(f".st-key-job_{job['id']}").get_by_text("cancelled").wait_for()
    page.get_by_text(re.compile(r"^0 running or queued")).wait_for()
    ui.wait_idle()
    assert sent_during(3000) == 0
