"""ReLU Atlas frontend entry point: ``streamlit run frontend/app.py``.

Builds the page menu from :mod:`frontend.catalog` and renders the shared sidebar before the
chosen page runs.
"""

import sys
from pathlib import Path

# `streamlit run` puts only this folder on sys.path; the pages import `frontend.*`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

from frontend import components  # noqa: E402
from frontend.catalog import PAGES  # noqa: E402

HERE = Path(__file__).resolve().parent

# A local favicon: without one, each page's ":material/..." icon is fetched from a font host.
st.set_page_config(page_title="ReLU Atlas", layout="wide", page_icon=components.favicon())
page = st.navigation([
    st.Page(HERE / p.file, title=p.title, icon=p.icon, url_path=p.url_path,
            default=p is PAGES[0])
    for p in PAGES
])
components.begin_run()
components.sidebar()
page.run()
