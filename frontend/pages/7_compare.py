"""Compare: placeholder until this analysis' page is built."""

import streamlit as st

from frontend import components as ui

ui.sidebar()
st.title("Compare")
st.info(
    "**Not built yet.** This page will show two or more models side by side on the same "
    "inputs and analyses: predictions, activation patterns and robustness."
)
