"""View state kept in the URL: shared keys survive page switches and reloads, so a view can be
shared as a link."""

from __future__ import annotations

from typing import Any

import streamlit as st

# URL keys this app keeps across pages (Streamlit drops the query string on page switches, so
# the last values are remembered in the session and written back on every page).
SHARED_KEYS = ("ws", "a", "b", "n", "method", "images", "seed", "excl", "layer")

# --------------------------------------------------------------------------------------------
# URL state


def _memory() -> dict[str, str]:
    return st.session_state.setdefault("_url_memory", {})


def qp(key: str, default: str | None = None) -> str | None:
    """A URL parameter, else the value remembered in this session, else ``default``."""
    v = st.query_params.get(key)
    if v is None or v == "":
        v = _memory().get(key, default)
    return v


def set_qp(**values: Any) -> None:
    """Write values to the URL (and the session memory); ``None`` removes a key."""
    mem = _memory()
    for k, v in values.items():
        if v is None:
            mem.pop(k, None)
            if k in st.query_params:
                del st.query_params[k]
        else:
            s = str(v)
            mem[k] = s
            if st.query_params.get(k) != s:
                st.query_params[k] = s


def restore_shared() -> None:
    """Put remembered shared keys back into the URL (after a page switch dropped them)."""
    mem = _memory()
    for k in SHARED_KEYS:
        if k in st.query_params and st.query_params[k] != "":
            mem[k] = st.query_params[k]
        elif k in mem:
            st.query_params[k] = mem[k]


def int_qp(key: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
    try:
        v = int(qp(key, str(default)) or default)
    except (TypeError, ValueError):
        v = default
    if lo is not None:
        v = max(lo, v)
    if hi is not None:
        v = min(hi, v)
    return v


def bool_qp(key: str, default: bool = False) -> bool:
    v = qp(key)
    return default if v is None else v in ("1", "true", "True", "yes")


def init_widget(key: str, value: Any) -> None:
    """Give a keyed widget its first value (from the URL) unless it already has one."""
    if key not in st.session_state:
        st.session_state[key] = value



# widgets and URL keys whose value belongs to one workspace (another workspace starts afresh)
WORKSPACE_WIDGETS = ("ex_excl", "co_excl")
WORKSPACE_URL_KEYS = ("excl",)


def scope_to_workspace(name: str) -> None:
    """Forget the workspace-bound view state (the exclude toggles) when this session moves to
    another workspace, so a setting of one workspace does not leak into the next."""
    prev = st.session_state.get("_scoped_ws")
    if prev is not None and prev != name:
        for k in WORKSPACE_WIDGETS:
            st.session_state.pop(k, None)
        set_qp(**{k: None for k in WORKSPACE_URL_KEYS})
    st.session_state["_scoped_ws"] = name
