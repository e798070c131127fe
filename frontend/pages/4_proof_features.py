"""Proof features: placeholder until this analysis' page is built."""

import streamlit as st

from frontend import components as ui

ui.sidebar()
st.title("Proof features")
st.info(
    "**Not built yet.** This page will show the features a robustness proof relies on: which "
    "neurons carry the certified bound, and how they differ between standard, PGD and "
    "certified training."
)
