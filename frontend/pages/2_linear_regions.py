"""Linear regions: exact pieces along a line, a plane region map, exact IG vs Captum, and the
density of pieces across sibling models (standard vs adversarially/certifiably trained)."""

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from frontend import components as ui
from frontend.client import ApiError
from frontend.figures import linear_regions as figures


def _measured_outcome(rows: list[dict]) -> str:
    """What this input shows about "robust training makes networks more linear", as
    measured: the fewest and most pieces per unit length along FGSM, and whether the standard
    model has more than every robustly trained one."""
    ranked = sorted(rows, key=lambda r: r["FGSM density"])
    fewest, most = ranked[0], ranked[-1]
    text = (f"Measured here: {fewest['model']} has the fewest pieces per unit length along "
            f"FGSM ({fewest['FGSM density']:.3g}), {most['model']} the most "
            f"({most['FGSM density']:.3g}). ")
    standard = [r for r in rows if r["training"] == "standard"]
    robust = [r for r in rows if r["training"] not in ("", "standard")]
    if not standard or not robust:
        return text + "No standard/robust pair to compare."
    dense = standard[0]["FGSM density"]
    if all(r["FGSM density"] < dense for r in robust):
        return text + "Every robustly trained model is more linear than the standard one."
    if all(r["FGSM density"] > dense for r in robust):
        return text + ("Every robustly trained model is denser than the standard one: the "
                       "\"more linear\" claim does not hold on this input.")
    return text + ("Mixed: some robust models are denser than the standard one, so the "
                   "\"more linear\" claim does not hold for all of them on this input.")


def _select(col, label: str, analysis: str, field: str) -> str:
    """A selectbox over the options the API serves for ``field`` (default preselected)."""
    options, default = ui.choices(analysis, field)
    return col.selectbox(label, options, index=default)


@st.cache_data(max_entries=16, show_spinner="drawing the region map")
def _plane_figure(job_id: str) -> go.Figure:
    """The region map of a finished plane job (built once per job: about a second for
    a thousand polygons, then reused by reruns, tabs and shared links)."""
    return figures.plane_map(ui.job_result(job_id))


def _density_rows(models: list[dict], input_id: str, params: dict) -> list[dict]:
    """One line job per model (cached by the service), followed with one progress bar."""
    api = ui.client()
    jobs = [api.submit("linear_regions_line", m["id"], input_id, params) for m in models]
    jobs = ui.follow(jobs, api.job, key="lr_robust_jobs", cancel=api.cancel,
                     text=lambda _: f"linear regions on {len(models)} models")
    rows = []
    for model, job in zip(models, jobs, strict=True):
        if job["status"] != "finished":
            st.error(f"{model['name']}: {job.get('error') or job['status']}")
            continue
        lin = api.result(job["id"])["linearity"]
        rows.append({"model": model["name"],
                     "training": (model.get("card") or {}).get("training", ""),
                     "FGSM density": lin["fgsm_density"],
                     "random density": lin["random_density"],
                     "FGSM / random": lin["density_ratio"],
                     "FGSM pieces": lin["fgsm_pieces"]})
    return rows


selection = ui.sidebar()
st.title("Linear regions")
st.caption(
    "A ReLU network is affine on each piece of a segment. ExactLine (Sotoudeh & Thakur) finds "
    "those pieces exactly, so the curves below are exact, not sampled. Adversarially trained "
    "networks are reported to be more linear; \"Robust vs standard\" measures whether that "
    "holds for these models on this input (density of pieces along FGSM and random lines)."
)
line_tab, plane_tab, ig_tab, robust_tab = st.tabs(
    ["Along a line", "In a plane", "Exact IG", "Robust vs standard"])

with line_tab:
    cols = st.columns(4)
    mode = cols[0].radio("Segment", ["direction", "input"],
                         format_func={"direction": "input + direction",
                                      "input": "input A to input B"}.get)
    params: dict = {"mode": mode}
    if mode == "direction":
        params["direction"] = _select(cols[1], "Direction", "linear_regions_line", "direction")
        params["length"] = cols[2].number_input("Length (L-inf)", 0.01, 10.0, 0.3, step=0.05)
        params["random_directions"] = int(cols[3].number_input("Random lines", 0, 16, 4))
    else:
        params["other_input_id"] = cols[1].text_input("Input B id", "gallery:digits:1")
    result = ui.run_job("linear_regions_line", params=params, key="lr_line")
    if result:
        line = result["line"]
        m = st.columns(3)
        m[0].metric("Linear pieces", line["num_pieces"])
        m[1].metric("Distinct patterns", line["num_patterns"])
        m[2].metric("Density (pieces / unit L2)", f"{line['density']:.2f}")
        ui.show_figure(figures.logits_along_line(result), "linear_regions_line")
        lin = result.get("linearity")
        if lin:
            st.subheader("Linearity: FGSM vs random directions")
            st.markdown(
                f"Density along FGSM **{lin['fgsm_density']:.2f}**, along random directions "
                f"**{lin['random_density']:.2f}** (ratio {lin['density_ratio']:.2f}). "
                f"Largest gap to the tangent, relative to the logit change: FGSM "
                f"{lin['fgsm_relative_tangent_gap']:.3f}, random "
                f"{lin['random_relative_tangent_gap']:.3f}.")
            ui.show_figure(figures.tangent_gap(result), "linear_regions_tangent")

with plane_tab:
    cols = st.columns(4)
    plane_params = {
        "shape": _select(cols[0], "Shape", "linear_regions_plane", "shape"),
        "first": _select(cols[1], "First side", "linear_regions_plane", "first"),
        "second": _select(cols[2], "Second side", "linear_regions_plane", "second"),
        "length": cols[3].number_input("Side length (L-inf)", 0.01, 10.0, 0.1, step=0.05),
    }
    result = ui.run_job("linear_regions_plane", params=plane_params, key="lr_plane")
    if result:
        m = st.columns(2)
        m[0].metric("Linear regions", result["num_regions"])
        m[1].metric("Polygons", result["num_polygons"],
                    help="regions are also cut where the predicted class changes")
        st.caption("Each colour patch is one linear region (one activation pattern; "
                   "neighbours get different colours), bold black lines are where the "
                   "predicted class changes, and the star is the input. Hover a point for its "
                   "region's pattern id and class.")
        ui.show_figure(_plane_figure(ui.shown_job("lr_plane")), "linear_regions_plane")

with ig_tab:
    cols = st.columns(3)
    ig_params: dict = {
        "baseline": _select(cols[0], "Baseline", "linear_regions_ig", "baseline"),
        "method": _select(cols[1], "Captum method", "linear_regions_ig", "method"),
    }
    if ig_params["baseline"] == "input":
        ig_params["baseline_input_id"] = cols[2].text_input("Baseline input id",
                                                            "gallery:digits:1")
    result = ui.run_job("linear_regions_ig", params=ig_params, key="lr_ig")
    if result:
        shape = result["input_shape"]
        st.markdown(
            f"Exact IG for class **{result['classes'][result['target']]}** from "
            f"**{result['num_pieces']}** pieces in {1e3 * result['exact_seconds']:.1f} ms; "
            f"completeness error **{result['completeness_error']:.1e}** "
            f"(F(x) - F(baseline) = {result['f_x'] - result['f_baseline']:.4f}).")
        table = pd.DataFrame(result["table"]).rename(columns={
            "steps": "Captum steps", "relative_error": "relative error", "seconds": "time (ms)"})
        table["relative error"] = (100 * table["relative error"]).map("{:.2f} %".format)
        table["time (ms)"] = (1e3 * table["time (ms)"]).round(1)  # as the exact IG's above
        st.dataframe(table, hide_index=True)
        exact = np.asarray(result["exact"]).reshape(shape)
        maps = st.columns(2)
        if len(shape) == 3:
            with maps[0]:
                ui.show_figure(ui.heatmap(exact.sum(0), "Exact IG"), "ig_exact")
            steps = st.select_slider("Captum steps", [str(r["steps"]) for r in result["table"]])
            with maps[1]:
                ui.show_figure(ui.heatmap(
                    np.asarray(result["captum"][steps]).reshape(shape).sum(0),
                    f"Captum IG, {steps} steps"), "ig_captum")
        ui.show_figure(figures.ig_error(result), "ig_error")


with robust_tab:
    st.caption("The same input on every model trained on this dataset with this architecture "
               "(standard, PGD, IBP, ...): exact linear pieces per unit length along the FGSM "
               "direction and along random sign directions of the same L-inf length.")
    cols = st.columns(2)
    robust_params = {
        "mode": "direction", "direction": "fgsm",
        "length": cols[0].number_input("Length (L-inf)", 0.01, 10.0, 0.3, step=0.05,
                                       key="lr_robust_length"),
        "random_directions": int(cols[1].number_input("Random lines", 1, 16, 4,
                                                      key="lr_robust_random")),
    }
    siblings = ui.sibling_models(selection.model) if selection.model else []
    wanted = (selection.input_id, tuple(sorted(robust_params.items())))
    if len(siblings) < 2 or selection.input_id is None:
        st.info("Choose a model whose card names its dataset and architecture, and an input.")
    elif st.button("Compare models", type="primary", key="lr_robust_run",
                   icon=":material/play_arrow:"):
        try:
            st.session_state["lr_robust"] = (
                wanted, _density_rows(siblings, selection.input_id, robust_params))
        except ApiError as exc:
            st.error(str(exc))
    shown = st.session_state.get("lr_robust")
    if shown and shown[0] == wanted and shown[1]:
        st.subheader("Robust vs standard: density for the same input")
        st.dataframe(pd.DataFrame(shown[1]), hide_index=True)
        st.caption(_measured_outcome(shown[1]))
        ui.show_figure(figures.density_comparison(shown[1]), "linear_regions_robust")
