"""Linear regions: exact pieces along a line, a plane region map, and exact IG vs Captum."""

import numpy as np
import pandas as pd
import streamlit as st

from frontend import components as ui
from frontend.figures import linear_regions as figures

selection = ui.sidebar()
st.title("Linear regions")
st.caption(
    "A ReLU network is affine on each piece of a segment. ExactLine (Sotoudeh & Thakur) finds "
    "those pieces exactly, so the curves below are exact, not sampled. Adversarially trained "
    "networks are reported to be more linear: compare the density of pieces along FGSM and "
    "random directions, and across models for the same input."
)
line_tab, plane_tab, ig_tab = st.tabs(["Along a line", "In a plane", "Exact IG"])

with line_tab:
    cols = st.columns(4)
    mode = cols[0].radio("Segment", ["direction", "input"],
                         format_func={"direction": "input + direction",
                                      "input": "input A to input B"}.get)
    params: dict = {"mode": mode}
    if mode == "direction":
        params["direction"] = cols[1].selectbox("Direction", ["fgsm", "pgd", "random"])
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
            key = f"density:{selection.model_id}:{selection.input_id}:{params.get('length')}"
            st.session_state.setdefault("_lr_densities", {})[key] = (
                selection.model["name"] if selection.model else "?", lin["fgsm_density"],
                lin["random_density"])
        rows = [{"model": name, "input": k.split(":", 2)[2].rsplit(":", 1)[0],
                 "FGSM density": f, "random density": r}
                for k, (name, f, r) in st.session_state.get("_lr_densities", {}).items()]
        if len(rows) > 1:
            st.subheader("Robust vs standard: density for the same input")
            st.caption("Run this tab on other models (sidebar) to add rows.")
            st.dataframe(pd.DataFrame(rows), hide_index=True)

with plane_tab:
    cols = st.columns(4)
    plane_params = {
        "shape": cols[0].selectbox("Shape", ["parallelogram", "triangle"]),
        "first": cols[1].selectbox("First side", ["fgsm", "pgd", "random"]),
        "second": cols[2].selectbox("Second side", ["random", "fgsm", "pgd"]),
        "length": cols[3].number_input("Side length (L-inf)", 0.01, 10.0, 0.1, step=0.05),
    }
    result = ui.run_job("linear_regions_plane", params=plane_params, key="lr_plane")
    if result:
        ui.show_figure(figures.plane_map(result), "linear_regions_plane")

with ig_tab:
    cols = st.columns(3)
    ig_params: dict = {
        "baseline": cols[0].selectbox("Baseline", ["zeros", "input"]),
        "method": cols[1].selectbox("Captum method", ["gausslegendre", "riemann_trapezoid"]),
    }
    if ig_params["baseline"] == "input":
        ig_params["baseline_input_id"] = cols[2].text_input("Baseline input id",
                                                            "gallery:digits:1")
    result = ui.run_job("linear_regions_ig", params=ig_params, key="lr_ig")
    if result:
        shape = result["input_shape"]
        st.markdown(
            f"Exact IG for class **{result['classes'][result['target']]}** from "
            f"**{result['num_pieces']}** pieces; completeness error "
            f"**{result['completeness_error']:.1e}** "
            f"(F(x) - F(baseline) = {result['f_x'] - result['f_baseline']:.4f}).")
        table = pd.DataFrame(result["table"]).rename(columns={
            "steps": "Captum steps", "relative_error": "relative error", "seconds": "time (s)"})
        table["relative error"] = (100 * table["relative error"]).map("{:.2f} %".format)
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
