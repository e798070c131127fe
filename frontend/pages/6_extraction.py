"""Weight recovery: placeholder until this analysis' page is built."""

import streamlit as st

from frontend import components as ui

ui.sidebar()
st.title("Weight recovery")
st.info(
    "**Not built yet.** This page will show how much of the network's weights an attacker can"
    " recover from queries alone, by locating the critical points where ReLUs switch."
)
