"""Intruder study, the participant's side: only the trials. Reached by a signed link
``?study=<token>&participant=<id>&sig=<sig>``; ``app.py`` registers no other page in that case,
and the session stays participant-only (see ``access.participant_session``).

A link whose ``sig`` is missing or is not the participant's (an edited ``participant=``) shows
one refusal message and nothing else. The study link without a participant asks for a name: a
new name is registered and the page moves to that name's signed link; a name that is taken
(given out by the lead, or registered by someone else) is refused unless the link carries its
valid signature."""

from __future__ import annotations

import time

import streamlit as st

import study as S
from explorer_core.errors import ExplorerError
from pages.ui import access, pictures

access.ensure_app_navigation()

# from the link; remembered in the session (a participant-only session), so the trials stay
# even when the query parameters are dropped
_link = access.participant_session() or {}
token = _link.get("study", "")
participant = _link.get("participant", "")
sig = _link.get("sig", "")


@st.cache_resource(show_spinner=False, max_entries=32)
def _find(token: str):
    from data_index.workspace import list_workspaces

    return S.find_study_by_token(token, list_workspaces())


@st.cache_resource(show_spinner=False, max_entries=256)
def _trials(path: str, study_id: str, participant: str) -> list:
    return S.trials_for(S.get_study(path, study_id), participant)


def _start(study: S.Study, name: str) -> None:
    """Self-registration: a new name, or a taken one with its valid signature in the link, moves
    the page to the name's signed link; any other taken name raises ParticipantTaken."""
    if S.verify_participant(study, name, sig):
        pid = S.register_participant(study, name)
    else:
        pid = S.claim_participant(study, name)
    psig = S.participant_sig(study, pid)
    st.query_params["participant"] = pid
    st.query_params["sig"] = psig
    st.session_state.setdefault(access.PARTICIPANT_KEY, {"study": token}).update(
        participant=pid, sig=psig)
    st.rerun()


def _page() -> None:
    ws, study = _find(token)
    if participant and not S.verify_participant(study, participant, sig):
        shown = participant[:64].replace("`", "'")  # from the URL: shown as code, never markup
        st.error(f"This link is not valid for participant `{shown}`; ask the study lead for "
                 "your personal link.", icon=":material/lock:")
        return
    st.title("Find the odd one out")
    if not participant:
        with st.form("participant_name"):
            name = st.text_input("Your name or participant id")
            if st.form_submit_button("Start", type="primary"):
                _start(study, name)
        return
    reg = st.session_state.setdefault("_registered", {})
    if (study.study_id, participant) not in reg:  # one short write per session, not per click
        reg[(study.study_id, participant)] = S.register_participant(study, participant)
    pid = reg[(study.study_id, participant)]
    trials = _trials(str(study.path), study.study_id, pid)
    idx = S.next_trial_index(study, pid)
    n = study.trials_per_participant
    if idx is None:
        st.progress(1.0, text=f"{n} of {n} trials done")
        st.success("All trials done. Thank you for taking part!")
        st.balloons()
        return
    trial = trials[idx]
    st.progress(idx / n, text=f"Trial {idx + 1} of {n}")
    st.markdown("Four of these five patches show the **same concept**. "
                "**Click the one that does not belong.**")
    shown = st.session_state.setdefault("_shown_at", {})
    shown.setdefault((study.study_id, pid, idx), time.monotonic())
    cols = st.columns(len(trial.crop_ids))
    for pos, (col, cid) in enumerate(zip(cols, trial.crop_ids)):
        with col:
            st.image(pictures.upscale(pictures.crop_pic(ws, cid), 160), width="stretch")
            if st.button(f"Odd one: {pos + 1}", key=f"pick_{idx}_{pos}",
                         width="stretch"):
                t0 = shown.pop((study.study_id, pid, idx), None)
                ms = int((time.monotonic() - t0) * 1000) if t0 is not None else None
                S.record_answer(study, pid, trial, pos, ms)
                st.rerun()
    st.caption(f"Participant: {pid}. Your answers are saved as you go; you can close this page "
               "and continue later with the same link.")


try:
    _page()
except ExplorerError as err:
    st.error(str(err), icon=":material/warning:")
