"""SMT saliency masks: IG picks the neurons, z3 finds the smallest mask that keeps them."""

import streamlit as st

from frontend import components as ui
from frontend.figures import saliency as figures

ui.sidebar()
st.title("SMT saliency")
st.caption(
    "SMUG (Sahoo et al., ICLR 2021): Integrated Gradients selects the first-layer neurons that "
    "carry the prediction; z3 finds the smallest set of input features that, with everything "
    "else replaced by the baseline, keeps each of them at or above a fraction of its value. "
    "Features inside the mask are ranked by their share of the neurons' required activation. "
    "IG and SmoothGrad are graded beside it at the same number of kept features."
)
cols = st.columns(4)
params = {
    "threshold": cols[0].slider("Threshold", 0.05, 1.0, 0.5, step=0.05,
                                help="each neuron keeps at least this fraction of its value"),
    "top_k": cols[1].slider("Top-k neurons", 1, 50, 10),
    "timeout_s": cols[2].number_input("Solver time-out (s)", 1.0, 600.0, 30.0, step=5.0),
}
patch = cols[3].selectbox("Granularity", ["auto", 1, 2, 4, "superpixel"],
                          format_func=lambda p: p if isinstance(p, str) else f"{p}x{p} patches")
if patch != "auto":
    params["granularity"] = patch

result = ui.run_job("saliency", params=params, key="saliency")
if result:
    m = st.columns(4)
    m[0].metric("Mask size", f"{result['mask_size']} of {result['num_groups']}")
    m[1].metric("Solver", result["status"])
    m[2].metric("Solver iterations", result["iterations"])
    m[3].metric("Solve time", f"{result['timings']['solve_s']:.2f} s")
    st.markdown(f"Explaining class **{result['target_class']}**; proven lower bound on the mask "
                f"size: {result['lower_bound']}.")
    if result["status"] == "infeasible":
        st.warning("No mask keeps every selected neuron at this threshold (above 1 it can be "
                   "impossible): lower the threshold.")
    ui.show_figure(figures.maps(result), "saliency_maps")
    st.subheader("Grading at the same number of kept features")
    st.dataframe(figures.grade_rows(result), hide_index=True)
    st.caption("Saliency metric (Dabkowski & Gal): log(max(box area, 0.05)) - log(p(class) on "
               "the input cropped to the box around the kept features); lower is better.")
    if result["grades"]:
        ui.show_figure(figures.curves(result), "saliency_curves")
    ui.show_figure(figures.neurons(result), "saliency_neurons")
    ui.download_json(result, "saliency.json")
