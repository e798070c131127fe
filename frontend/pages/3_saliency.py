"""SMT saliency: placeholder until this analysis' page is built."""

import streamlit as st

from frontend import components as ui

ui.sidebar()
st.title("SMT saliency")
st.info(
    "**Not built yet.** This page will show which input pixels provably matter: an SMT solver"
    " (z3) checks which pixels can change the decision when freed within a budget, for an "
    "explanation with a guarantee rather than a gradient."
)
