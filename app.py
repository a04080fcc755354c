"""Concept explorer: the Streamlit entry point (``streamlit run app.py``).

Routes to the pages in ``pages/`` with ``st.navigation``. A participant link of the intruder
study (``?study=<token>&participant=<id>``) registers ONLY the participant page, with the
navigation hidden, so a participant never sees the lead's pages or other participants' answers.
"""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="Concept explorer", page_icon=":material/extension:", layout="wide")

if st.query_params.get("study"):
    st.markdown("<style>[data-testid='stSidebar'], [data-testid='stSidebarCollapsedControl'],"
                "[data-testid='stExpandSidebarButton'] {display: none !important;}</style>",
                unsafe_allow_html=True)
    page = st.navigation([st.Page("pages/participant.py", title="Intruder study", icon=":material/search:",
                                  url_path="participant", default=True)], position="hidden")
else:
    page = st.navigation([
        st.Page("pages/home.py", title="Workspace", icon=":material/home:", url_path="home", default=True),
        st.Page("pages/explain.py", title="Explain a class", icon=":material/extension:", url_path="explain"),
        st.Page("pages/contrast.py", title="Contrast two classes", icon=":material/compare_arrows:", url_path="contrast"),
        st.Page("pages/test_bench.py", title="Test bench", icon=":material/science:", url_path="test_bench"),
        st.Page("pages/study.py", title="Intruder study", icon=":material/search:", url_path="study"),
    ])
page.run()
