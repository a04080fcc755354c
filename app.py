"""Concept explorer: the Streamlit entry point (``streamlit run app.py``).

Routes to the pages in ``pages/`` with ``st.navigation``.

Access control (who sees what):

* **Participants.** A participant link of the intruder study
  (``?study=<token>&participant=<id>&sig=<sig>``) registers ONLY the participant page, with the
  navigation hidden. The session is marked participant-only in its session state, so it stays on
  the trials even when the query parameters are dropped later in the same session. The page
  shows trials only for a valid ``sig`` (signed per participant with the study's server-side
  secret), so editing ``participant=`` gets a refusal, not another participant's trials.
* **Lead key.** Start the server with ``CONCEPT_EXPLORER_LEAD_KEY=<secret>`` whenever anyone but
  you can reach it (an intruder study with outside participants). Every other page then shows
  only a password form until the key is given once per browser session; a link with
  ``?key=<secret>`` also unlocks, and the key is removed from the address bar at once.
  Participant links never need the key. Without the variable the app is open (single-user local
  use) and the Study page warns that participants could reach the lead's pages.
"""

from __future__ import annotations

import streamlit as st

from pages.ui import access, trust

st.set_page_config(page_title="Concept explorer", page_icon=":material/extension:", layout="wide")
trust.apply()  # the user model files this browser session confirmed, and no others

if access.participant_session() is not None:
    st.markdown("<style>[data-testid='stSidebar'], [data-testid='stSidebarCollapsedControl'],"
                "[data-testid='stExpandSidebarButton'] {display: none !important;}</style>",
                unsafe_allow_html=True)
    page = st.navigation([st.Page("pages/participant.py", title="Intruder study", icon=":material/search:",
                                  url_path="participant", default=True)], position="hidden")
    page.run()
else:
    unlocked = access.lead_unlocked()
    # the same pages either way, so a locked session keeps its URL (``/explain?...``) and lands
    # on the page it asked for once the key is given; a locked session runs none of them
    page = st.navigation([
        st.Page("pages/home.py", title="Workspace", icon=":material/home:", url_path="home", default=True),
        st.Page("pages/explain.py", title="Explain a class", icon=":material/extension:", url_path="explain"),
        st.Page("pages/contrast.py", title="Contrast two classes",
                icon=":material/compare_arrows:", url_path="contrast"),
        st.Page("pages/test_bench.py", title="Test bench", icon=":material/science:", url_path="test_bench"),
        st.Page("pages/evaluate.py", title="Evaluate (sweeps)", icon=":material/monitoring:",
                url_path="evaluate"),
        st.Page("pages/study.py", title="Intruder study", icon=":material/search:", url_path="study"),
        st.Page("pages/runs.py", title="Runs", icon=":material/history:", url_path="runs"),
    ], position="sidebar" if unlocked else "hidden")
    if unlocked:
        page.run()
    else:
        access.lead_key_form()
