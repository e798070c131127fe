"""Jobs: every analysis job of the service, with live progress, cancel and a link to results."""

import json

import streamlit as st

from frontend import components as ui
from frontend.catalog import page_for
from frontend.client import ACTIVE, ApiError

POLL_SECONDS = 1.0
_LIVE = "_atlas_jobs_live"

ui.sidebar()
st.title("Jobs")
st.caption("All analysis jobs, newest first. Running jobs update live; finished ones link to "
           "the page that shows their result.")
show_done = st.toggle("Show finished, failed and cancelled jobs", value=True)


def _params_text(params: dict, limit: int = 6) -> str:
    """The job's parameters as ``eps=0.05, method=crown``; long lists shortened."""
    parts = []
    for key, value in list(params.items())[:limit]:
        text = json.dumps(value) if not isinstance(value, str) else value
        parts.append(f"{key}={text if len(text) <= 24 else text[:21] + '...'}")
    return ", ".join(parts) + (", ..." if len(params) > limit else "")


def _job_row(job: dict, names: dict[str, str]) -> None:
    cols = st.columns([2, 3, 4, 1.4])
    cols[0].markdown(f"**{job['analysis']}**  \n`{job['id'][:8]}`")
    model = names.get(job["model_id"], job["model_id"][:8])
    cols[1].caption(f"model **{model}**  \ninput `{job.get('input_id') or '–'}`  \n"
                    f"{job.get('created_at', '')[:19].replace('T', ' ')}")
    if job.get("params"):
        cols[1].caption(_params_text(job["params"]))
    status = job["status"]
    with cols[2]:
        if status in ACTIVE:
            st.progress(float(job.get("progress") or 0.0),
                        text=f"{status}: {job.get('message') or ''}")
        elif status == "failed":
            st.error(job.get("error") or "failed", icon=":material/error:")
        else:
            color = "green" if status == "finished" else "gray"
            st.markdown(f":{color}-badge[{status}]" + (" (cached)" if job.get("cached") else ""))
    with cols[3]:
        if status in ACTIVE:
            if st.button("Cancel", key=f"cancel_{job['id']}", icon=":material/stop:"):
                ui.client().cancel(job["id"])
                st.rerun(scope="fragment")
        elif status == "finished" and (page := page_for(job["analysis"])):
            params = {"job": job["id"], "model": job["model_id"]}
            if job.get("input_id"):
                params["input"] = job["input_id"]
            st.page_link(page.file, label="Open", icon=":material/open_in_new:",
                         query_params=params)


def job_list(live: bool) -> None:
    """The jobs; while ``live`` the fragment redraws every second so progress bars move.

    When the jobs go quiet (or one starts), a full rerun switches the polling off (or on).
    """
    try:
        jobs = ui.client().jobs()
        names = {m["id"]: m["name"] for m in ui.client().models()}
    except ApiError as exc:
        st.error(str(exc))
        return
    jobs.sort(key=lambda j: j.get("created_at", ""), reverse=True)
    active = [j for j in jobs if j["status"] in ACTIVE]
    cols = st.columns([5, 1])
    cols[0].markdown(f"{len(active)} running or queued, {len(jobs) - len(active)} done.")
    if not live:
        cols[1].button("Refresh", icon=":material/refresh:", key="jobs_refresh")
    for job in jobs if show_done else active:
        with st.container(border=True, key=f"job_{job['id']}"):
            _job_row(job, names)
    if bool(active) != live:
        st.session_state[_LIVE] = bool(active)
        st.rerun()


live = st.session_state.get(_LIVE, False)
st.fragment(job_list, run_every=POLL_SECONDS if live else None)(live)
