"""In the browser: how long each page's default analysis takes from Run to its result on a
sample model, and how long its shared link takes to show that result again. Printed as
``TIMING`` lines so regressions are visible; nothing here asserts a time.

Oracle for what is timed: the API's record of the job the page's URL names (finished, and
not run again when the link is reopened).
"""

from __future__ import annotations

import re
import time

import pytest

MODEL = "digits_fc_pgd"
INPUT = "gallery:digits:5"

pytestmark = pytest.mark.browser

# (page url, primary job widget key): each page's first analysis with its default settings;
# the weight recovery's default run takes minutes (218 s on a loaded 2-core machine): slow
PAGES = [("", "predict"), ("linear_regions", "lr_line"), ("saliency", "saliency"),
         ("proof_features", "proof_features"), ("patterns", "patterns"),
         pytest.param("extraction", "extraction", marks=pytest.mark.slow)]


@pytest.mark.parametrize(("url_path", "key"), PAGES,
                         ids=["predict", "lr_line", "saliency", "proof_features", "patterns",
                              "extraction"])
def test_page_timing(ui, atlas, url_path: str, key: str) -> None:
    ui.open_sample(url_path, MODEL, input=INPUT)
    page = ui.page
    start = time.monotonic()
    ui.click_run(key)
    page.wait_for_function("() => new URLSearchParams(location.search).has('job')")
    job_id = ui.query_params()["job"]
    caption = re.compile(rf"Job {job_id[:8]} finished")
    page.get_by_text(caption).wait_for(timeout=600_000)
    ui.wait_idle()
    run_s = time.monotonic() - start
    with atlas.api() as api:
        assert api.get(f"/jobs/{job_id}").json()["status"] == "finished"
        jobs = len(api.get("/jobs").json())

    shared = type(ui)(page.context.new_page(), atlas)
    start = time.monotonic()
    shared.page.goto(page.url)
    shared.page.get_by_text(caption).wait_for(timeout=120_000)
    shared.wait_idle()
    link_s = time.monotonic() - start
    with atlas.api() as api:
        assert len(api.get("/jobs").json()) == jobs  # the link reopened the job, ran nothing
    shared.page.close()
    print(f"\nTIMING page={url_path or 'predict'} analysis_key={key} "
          f"run_to_result_s={run_s:.2f} shared_link_s={link_s:.2f}")
