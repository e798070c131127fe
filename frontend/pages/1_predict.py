"""Predict: the network's class scores for the chosen input and the ReLUs it switches on."""

import streamlit as st

from frontend import components as ui
from frontend.figures import predict as figures

st.title("Predict")
st.caption(
    "What the network outputs for the chosen input, and its activation pattern: which ReLUs "
    "the input switches on, layer by layer. The pattern fixes the linear piece of the network "
    "the input falls in, which the other pages analyse."
)

result = ui.run_job("predict", key="predict")
if result:
    predicted, label = result["predicted_class"], result.get("label")
    verdict = "" if label is None else (
        " — correct." if result["correct"] else f" — but the true label is **{label}**."
    )
    st.markdown(
        f"The network predicts class **{predicted}** with score "
        f"{result['scores'][result['predicted']]:.3f}{verdict}"
    )
    cols = st.columns(3)
    cols[0].metric("Predicted class", predicted)
    cols[1].metric("True label", "unknown" if label is None else label)
    cols[2].metric("ReLUs on", f"{result['total_active']} / {result['total_neurons']}")
    left, right = st.columns(2)
    with left:
        ui.show_figure(figures.class_scores(result), "class_scores")
    with right:
        ui.show_figure(figures.layer_activity(result), "layer_activity")
    with st.expander("Activation pattern per layer"):
        for layer in result["layers"]:
            title = (f"node {layer['node']}: {layer['active']} of {layer['neurons']} on"
                     f" (shape {'x'.join(map(str, layer['shape']))})")
            figure = (ui.heatmap(figures.pattern_grid(layer), title, colorscale="Greens",
                                 symmetric=False, colorbar_title="on", hover="on")
                      if len(layer["shape"]) == 3 else figures.pattern_strip(layer, title))
            ui.show_figure(figure, f"pattern_node{layer['node']}")
