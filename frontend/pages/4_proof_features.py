"""Proof features: certify an eps-ball, prune the proof, see what each kept feature looks at."""

from pathlib import Path

import streamlit as st

from frontend import components as ui
from frontend.client import ApiError
from frontend.figures import proof_features as figures

st.title("Proof features")
st.caption(
    "A bound propagator proves that no input in the eps-ball around this one changes the "
    "prediction. Projected onto the penultimate layer, the proof is one interval per neuron: "
    "its proof features. Most are not needed: pruning keeps the few high-priority features "
    "that still prove the property (ProFIt, ICLR 2024), and each kept feature is drawn as the "
    "gradient of its interval's midpoint over the input."
)

selection = ui.sidebar()
left, right = st.columns(2)
eps = left.slider("eps (L-inf radius)", 0.005, 0.3, 0.05, step=0.005, format="%.3f")
methods, default_method = ui.choices("proof_features", "method")
method = right.radio("Bound method", methods, index=default_method, horizontal=True,
                     help="bab: branch and bound over ReLU splits (complete where it finishes "
                          "within the time limit); its features are alpha-CROWN's")
params = {"eps": eps, "method": method}

result = ui.run_job("proof_features", params, key="proof_features")
if result:
    verdict = "Certified" if result["certified"] else "Not certified"
    st.subheader(f"{verdict}: class {result['predicted']} at eps {result['eps']:.3f} "
                 f"({result['method']})")
    cols = st.columns(4)
    cols[0].metric("Margin (lower bound)", f"{result['margin']:.3f}")
    cols[1].metric("Proof features", f"{result['num_nonzero']} / {result['num_features']}",
                   help="features with nonzero priority / all penultimate neurons")
    cols[2].metric("Kept after pruning", result["num_kept"])
    cols[3].metric("Kept set re-verified", "yes" if result["sufficient"] else "no")
    if result.get("note"):
        st.info(result["note"])
    if result["certified"] and result["num_kept"]:
        ui.show_figure(figures.gradient_grid(result, title="Gradient maps of the kept features"),
                       "proof_gradient_maps")
        ui.show_figure(figures.feature_intervals(result), "proof_feature_intervals")
    elif not result["certified"]:
        st.info("The bound method cannot prove this ball, so there is no proof to explain. "
                "Try a smaller eps or another method.")

    siblings = [m for m in ui.sibling_models(selection.model) if m["id"] != selection.model_id]
    if siblings and not str(selection.input_id).startswith("gallery:"):
        st.caption("Other training methods can be compared on gallery inputs only: an "
                   "uploaded input belongs to this model.")
    elif siblings:
        st.subheader("Same input and eps, other training methods")
        if st.button("Compare", key="proof_siblings"):
            api = ui.client()
            try:
                jobs = [api.submit("proof_features", m["id"], selection.input_id, params)
                        for m in siblings]
                jobs = ui.follow(jobs, api.job, key="proof_siblings", cancel=api.cancel,
                                 text=lambda js: "proving on the other training methods")
            except ApiError as exc:
                st.error(str(exc))
                jobs = []
            for col, model, job in zip(st.columns(len(siblings)), siblings, jobs, strict=False):
                training = (model.get("card") or {}).get("training", model["name"])
                with col:
                    if job["status"] != "finished":
                        st.error(job.get("error") or job["status"])
                        continue
                    try:
                        other = api.result(job["id"])
                    except ApiError as exc:
                        st.error(str(exc))
                        continue
                    st.markdown(f"**{training}**: "
                                f"{'certified' if other['certified'] else 'not certified'}, "
                                f"{other['num_kept']} of {other['num_features']} features kept")
                    ui.show_figure(figures.gradient_grid(other, columns=2), f"proof_{training}",
                                   key=f"proof_grid_{model['id']}")

st.divider()
st.subheader("Largest certified eps per method")
eps_methods, _ = ui.choices("proof_eps", "methods")
bisected = st.multiselect("Methods", eps_methods, default=ui.default("proof_eps", "methods"),
                          key="proof_eps_methods",
                          help="alpha-crown and bab are stronger and slower; each method's "
                               "bisection stops after its time limit, keeping the largest eps "
                               "proven so far")
found = ui.run_job("proof_eps", {"methods": bisected or ["crown"]}, key="proof_eps")
if found:
    ui.show_figure(figures.largest_eps(found), "proof_largest_eps")

st.subheader("Bound methods over the gallery")
compared = ui.run_job("proof_compare", {"eps": eps}, key="proof_compare")
if compared:
    st.dataframe(compared["rows"], hide_index=True)

st.divider()
st.subheader("VNN-LIB property")
st.caption(
    "A property as VNN-COMP writes it: an input box and linear constraints on the outputs that "
    "together describe a counterexample. The verifier answers proven (no input in the box "
    "meets them), a counterexample (checked by a forward pass) or unknown within the time "
    "limit. Branch and bound splits the input on low-dimensional inputs and ReLUs on large "
    "ones; a proof by ReLU splits shows that every leaf (a set of ReLUs fixed active or "
    "inactive) has a positive lower bound, not one feature set per leaf."
)
SHARED_VNN = Path(__file__).resolve().parents[3] / "shared" / "data" / "vnncomp2021"
shared_files = sorted(SHARED_VNN.glob("*/*.vnnlib")) if SHARED_VNN.exists() else []
source = st.radio("Property", ["Upload a .vnnlib file", "Shared VNN-COMP 2021 file"],
                  horizontal=True, key="vnn_source") if shared_files else "Upload a .vnnlib file"
text = None
if source.startswith("Upload"):
    uploaded = st.file_uploader("VNN-LIB file", type=["vnnlib", "txt"], key="vnn_upload")
    if uploaded is not None:
        text = uploaded.getvalue().decode("utf-8", errors="replace")
else:
    picked = st.selectbox("Shared file", shared_files, key="vnn_shared",
                          format_func=lambda p: f"{p.parent.name}/{p.name}")
    text = picked.read_text() if picked else None
v_left, v_right = st.columns(2)
v_methods, v_default = ui.choices("verify_property", "method")
v_method = v_left.selectbox("Method", v_methods, index=v_default, key="vnn_method")
v_limit = v_right.number_input("Time limit (s)", 1.0, 600.0, 60.0, step=10.0, key="vnn_limit")
if text is None:
    st.info("Upload or pick a .vnnlib file; its inputs and outputs must match the model's.")
else:
    verdict = ui.run_job("verify_property", {"vnnlib": text, "method": v_method,
                                             "time_limit": v_limit}, key="verify_property")
    if verdict:
        cols = st.columns(3)
        cols[0].metric("Verdict", verdict["status"])
        cols[1].metric("Time", f"{verdict['seconds']:.2f} s")
        cols[2].metric("Cases", verdict["cases"],
                       help="conjunctions of the counterexample region after expansion")
        st.caption(verdict["message"])
        if verdict["status"] == "counterexample":
            ui.show_figure(figures.property_verdict(verdict), "vnnlib_counterexample")
