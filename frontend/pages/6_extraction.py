"""Weight recovery: the model as a black box, its weights recovered from queries alone."""

import pandas as pd
import streamlit as st

from frontend import components as ui
from frontend.figures import extraction as figures

ui.sidebar()
st.title("Weight recovery")
st.caption(
    "An attacker who can only query the model (inputs in, logits out) finds the critical "
    "points where single ReLUs switch, by binary search along lines; the jump of the gradient "
    "there gives the neuron's weights up to scale (Carlini, Jagielski & Mironov 2020; Rolnick "
    "& Kording 2020). Layer by layer, signs and deeper layers follow. The true weights are "
    "used only afterwards, to grade the result."
)
cols = st.columns(3)
budget = cols[0].number_input("Query budget", 1_000, 2_000_000, 200_000, step=10_000)
margin = cols[1].number_input("Search margin (input-range widths)", 0.0, 5.0, 1.0, step=0.5)
depth = cols[2].number_input("Max hidden layers", 1, 3, 3)
params = {"budget": int(budget), "domain_margin": float(margin), "max_hidden_layers": int(depth)}

result = ui.run_job("extraction", params=params, key="extraction")
if result:
    spent = f"**{result['queries']:,}** queries in {result['seconds']:.1f} s"
    if result["layer_sizes"]:
        found = " + ".join(map(str, result["layer_sizes"]))
        st.markdown(f"Recovered hidden layers: **{found}** neurons, with {spent}."
                    + (" **Complete**: every critical point found is explained and the outputs "
                       "agree on validation queries." if result["complete"] else " *(partial)*"))
    else:
        st.markdown(f"No hidden layer was recovered ({spent}); the notes below say why.")
    for note in result["notes"]:
        st.warning(note)
    grading = result.get("grading")
    if grading:
        metrics = st.columns(3)
        metrics[0].metric("Arg-max agreement", f"{100 * grading['argmax_agreement']:.2f} %")
        diff = grading["max_abs_logit_diff"]
        metrics[1].metric("Max logit difference", "n/a" if diff is None else f"{diff:.2e}")
        metrics[2].metric("Queries", f"{result['queries']:,}")
        st.subheader("Grading against the true weights")
        st.dataframe(pd.DataFrame(grading["layers"]), hide_index=True)
    ui.show_figure(figures.discovery(result), "extraction_discovery")
    if result.get("pairs") and len(result["input_shape"]) >= 2:
        ui.show_figure(figures.weight_pairs(result), "extraction_weights")
    if result.get("region_map"):
        ui.show_figure(figures.boundaries_2d(result), "extraction_boundaries")
