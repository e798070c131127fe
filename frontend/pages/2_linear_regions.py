"""Linear regions: placeholder until this analysis' page is built."""

import streamlit as st

from frontend import components as ui

ui.sidebar()
st.title("Linear regions")
st.info(
    "**Not built yet.** This page will show the linear pieces of the network around the "
    "input: how the activation pattern changes along a line or a plane through input space, "
    "and the affine map the network computes inside each piece."
)
