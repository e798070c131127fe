"""SMT saliency masks: IG picks the neurons, an exact solver finds the smallest mask keeping them."""

import streamlit as st

from frontend import components as ui
from frontend.figures import saliency as figures

ui.sidebar()
st.title("SMT saliency")
st.caption(
    "SMUG (Sahoo et al., ICLR 2021): Integrated Gradients selects the first-layer neurons that "
    "carry the prediction; an exact 0/1 solver (HiGHS, or z3 as in SMUG) finds the smallest set "
    "of input features that, with everything else replaced by the baseline, keeps each of them "
    "at or above a fraction of its value. The guarantee is about those first-layer neurons, not "
    "the decision: whether the masked input keeps the class is measured below. Features inside "
    "the mask are ranked by their share of the neurons' change from the baseline. IG and "
    "SmoothGrad are graded beside it with the same baseline at the same number of kept features."
)
cols = st.columns(4)
extra = st.columns(2)
baseline = extra[0].selectbox("Baseline (masked-out features)", [0.0, 0.5, "blurred"],
                              format_func=lambda b: b if isinstance(b, str) else f"constant {b}")
solvers, default_solver = ui.choices("saliency", "solver")
params = {
    "baseline": baseline,
    "solver": extra[1].selectbox("Solver", solvers, index=default_solver,
                                 format_func=lambda s: {"highs": "HiGHS (MILP)",
                                                        "bisection": "z3 bisection",
                                                        "optimize": "z3 Optimize"}.get(s, s)),
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
    if not result["neurons"]:
        st.warning("No first-layer neuron is both active on the input and positively "
                   "attributed (IG) from this baseline: nothing is constrained, so the empty "
                   "mask is trivially minimal and guarantees nothing. Try another baseline.")
    elif result["status"] == "infeasible":
        st.warning("Proven: no mask keeps every selected neuron at this threshold (above 1 it "
                   "can be impossible): lower the threshold.")
    elif result["status"] != "optimal":
        st.info(f"{result['status']}: the mask holds, but no proof that it is the smallest "
                f"(proven lower bound {result['lower_bound']}).")
    ui.show_figure(figures.maps(result), "saliency_maps")
    st.subheader("Grading at the same number of kept features")
    st.dataframe(figures.grade_rows(result), hide_index=True)
    names = {"smt": "SMT mask", "ig": "IG", "smoothgrad": "SmoothGrad"}
    st.markdown("  \n".join(
        f"Best {key.replace('_', ' ')}: " + ", ".join(names.get(m, m) for m in best)
        + (" (tie)" if len(best) > 1 else "")
        for key, best in result.get("winners", {}).items()))
    st.caption("Saliency metric (Dabkowski & Gal): log(max(box area, 0.05)) - log(p(class) on "
               "the input cropped to the box around the kept features); lower is better.")
    if result["grades"]:
        ui.show_figure(figures.curves(result), "saliency_curves")
    ui.show_figure(figures.neurons(result), "saliency_neurons")
    ui.download_json(result, "saliency.json")

st.subheader("Verified explanation (VeriX)")
st.caption(
    "Wu et al., NeurIPS 2023: the features that, fixed at the input's values, provably keep "
    "the predicted class for every input within eps of it elsewhere (inside the input range). "
    "Features are freed least sensitive first, each step proven by CROWN bounds or a MILP; "
    "each kept feature comes with a counterexample once freed, or is marked 'sound, not "
    "proven irreducible' where the complete check ran out of time or the time-out came "
    "before one was tried (those features got only an attack).")
vcols = st.columns(2)
verix_params = {
    "eps": vcols[0].number_input("eps", 0.001, 1.0, 0.05, step=0.01, format="%.3f"),
    "timeout_s": vcols[1].number_input("Time-out (s)", 1.0, 600.0, 60.0, step=10.0),
}
verix = ui.run_job("verified_explanation", params=verix_params, key="verix")
if verix:
    v = st.columns(4)
    v[0].metric("Explanation size", f"{verix['size']} of {verix['num_features']}")
    v[1].metric("Irreducible", "proven" if verix["irreducible"] else "not proven")
    v[2].metric("Witnessed / unproven", f"{len(verix['witnessed'])} / {len(verix['unproven'])}")
    v[3].metric("Time", f"{verix['timings']['total_s']:.1f} s")
    ui.show_figure(figures.verified(verix), "verified_explanation")
    st.markdown("Freed, in order (first 40): "
                + ", ".join(str(i) for i in verix["freed"][:40]))
    ui.download_json(verix, "verified_explanation.json")
