"""Who may see what: ``app.py``'s navigation, the lead key, participant-only sessions."""

from __future__ import annotations

import hmac
import os

import streamlit as st

# --------------------------------------------------------------------------------------------
# navigation


def ensure_app_navigation() -> None:
    """Make sure the page runs under ``app.py``'s ``st.navigation``.

    Streamlit decides at server start that an app with a ``pages/`` folder is a v1 multipage app,
    until the first run of ``app.py`` calls ``st.navigation``. If the very first request of a
    fresh server opens a page URL (``/explain``, a participant link to ``/participant``), that
    page would run on its own with every file of ``pages/`` listed in the sidebar. Switch the
    v1 mode off and rerun, so ``app.py`` routes (and hides the lead pages from participants)."""
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        if not st.session_state.to_dict():  # a first request: no widget input can be lost
            st.rerun()


# --------------------------------------------------------------------------------------------
# access: the lead key and participant-only sessions

LEAD_KEY_ENV = "CONCEPT_EXPLORER_LEAD_KEY"
_LEAD_OK = "_lead_unlocked"
PARTICIPANT_KEY = "_participant_link"
_KEY_ERROR = "_lead_key_error"


def lead_key() -> str:
    """The server's lead key (``$CONCEPT_EXPLORER_LEAD_KEY``, stripped); ``""`` = no key, the
    app is open to everyone who can reach the server (single-user local use)."""
    return os.environ.get(LEAD_KEY_ENV, "").strip()


def _key_matches(given: str, key: str) -> bool:
    return hmac.compare_digest(given.strip().encode(), key.encode())


def participant_session() -> dict[str, str] | None:
    """The participant link of this session (``study``, ``participant``, ``sig``), or None for a
    lead session.

    A session that was opened with ``?study=`` is marked participant-only in its session state:
    it stays on the participant page even when the query parameters are dropped later. The
    ``sig`` always comes with the ``participant`` it was given with (a link naming another
    participant without a signature does not inherit one); the participant page checks it
    (``study.verify_participant``) before showing any trial."""
    token = st.query_params.get("study")
    if token:
        rec = st.session_state.setdefault(PARTICIPANT_KEY, {})
        if rec.get("study") not in (None, token):  # another study: nothing of the old link
            rec.clear()
        rec["study"] = token
        pid, sig = st.query_params.get("participant"), st.query_params.get("sig")
        if pid:
            rec["participant"] = pid
            rec["sig"] = sig or ""
        elif sig:  # a signature without a name: checked against the name the form is given
            rec["sig"] = sig
    return st.session_state.get(PARTICIPANT_KEY)


def lead_unlocked() -> bool:
    """Whether this session may see the lead pages.

    Never for a participant session; always when no lead key is configured; otherwise once the
    key was given in this browser session (the form, or ``?key=`` in the URL, which is removed
    from the URL at once)."""
    if participant_session() is not None:
        return False
    key = lead_key()
    if not key:
        return True
    if st.session_state.get(_LEAD_OK):
        if "key" in st.query_params:
            del st.query_params["key"]
        return True
    given = st.query_params.get("key")
    if given is not None:
        del st.query_params["key"]  # never leave the key in the address bar or the history
        if _key_matches(given, key):
            st.session_state[_LEAD_OK] = True
            return True
        st.session_state[_KEY_ERROR] = "The key in the link is wrong."
    return False


def lead_key_form() -> None:
    """The only thing a locked session sees: a password form for the lead key."""
    st.title("Concept explorer: lead key needed")
    st.markdown("This server is protected with a **lead key**. Enter it to open the explorer.  \n"
                "Taking part in a study? Use the participant link you were given.")
    err = st.session_state.pop(_KEY_ERROR, None)
    with st.form("lead_key_form", border=True, width=420):
        given = st.text_input("Lead key", type="password", key="lead_key_input",
                              help=f"The value of ${LEAD_KEY_ENV} on the server")
        ok = st.form_submit_button("Unlock", type="primary", icon=":material/lock_open:")
    if ok:
        if _key_matches(given or "", lead_key()):
            st.session_state[_LEAD_OK] = True
            st.rerun()
        err = "Wrong key. Ask whoever runs this server for the lead key."
    if err:
        st.error(err, icon=":material/lock:")


def lead_page() -> None:
    """First call of every lead page: ``app.py``'s navigation, and no lead content unless this
    session is unlocked (a second line of defence: ``app.py`` does not run locked pages)."""
    ensure_app_navigation()
    if lead_unlocked():
        return
    if participant_session() is not None:
        st.info("This browser tab belongs to a study participant: only the trials are available. "
                "Open your participant link again to continue.", icon=":material/lock:")
    else:
        lead_key_form()
    st.stop()

