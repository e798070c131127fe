"""Pattern rules: placeholder until this analysis' page is built."""

import streamlit as st

from frontend import components as ui

ui.sidebar()
st.title("Pattern rules")
st.info(
    "**Not built yet.** This page will show rules over activation patterns: which on/off "
    "combinations of neurons imply a class, mined from the gallery and checked for how often "
    "they hold."
)
