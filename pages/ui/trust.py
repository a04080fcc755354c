"""Running the user's own model code (``python:`` specs) only where this browser session said so.

A ``python:`` model spec imports a Python file and runs it on the server. The app loads such a
model only after the person at this browser confirmed, on the Workspace page, "I trust <file>:
load it" (:func:`confirm`); the confirmation is kept in ``st.session_state`` (this session only,
never in the URL) and handed to the model loader at the start of every page run
(:func:`apply`, called by ``app.py``), as the current script thread's trusted files
(:func:`explorer_core.trust.set_code_trust`). A link naming a workspace whose model is such a
spec therefore shows a refusal on every page until its session confirms; another session's
confirmation never counts, also when the server already holds the model.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from explorer_core.models import code_file
from explorer_core.trust import set_code_trust

TRUST_KEY = "trusted_code_files"


def trusted_files() -> list[str]:
    """The code files this browser session confirmed (absolute, resolved paths)."""
    return list(st.session_state.get(TRUST_KEY, []))


def apply() -> None:
    """Hand this session's confirmed files to the model loader for the rest of this run."""
    set_code_trust(trusted_files())


def trust(path: str) -> None:
    """Record that this session trusts the code of ``path`` (and apply it at once)."""
    files = trusted_files()
    if path not in files:
        st.session_state[TRUST_KEY] = [*files, path]
    apply()


def confirm(spec: str, key: str) -> bool:
    """For a spec that runs a user's file: a warning and the button "I trust <file>: load it";
    True once this session confirmed (at once for specs that run no user code)."""
    path = code_file(spec)
    if path is None:
        return True
    if path in trusted_files():
        st.caption(f"This model runs the Python code of `{path}` (trusted in this browser "
                   "session).")
        return True
    st.warning(f"The model spec `{spec}` imports **{path}** and runs its Python code on this "
               "server, with the server's rights. Load it only if you wrote or trust that "
               "file.", icon=":material/code:")
    if st.button(f"I trust {Path(path).name}: load it", key=key):
        trust(path)
        return True
    return False
