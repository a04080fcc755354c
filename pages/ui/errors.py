"""User errors as messages, never a traceback: :func:`guard` around everything a page computes."""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import streamlit as st

from explorer_core.errors import ExplorerError

log = logging.getLogger("concept_explorer.app")

# --------------------------------------------------------------------------------------------
# errors


@contextlib.contextmanager
def guard(what: str = "") -> Iterator[None]:
    """Show an :class:`ExplorerError` as ``st.error`` (its message says what to do); anything
    else as a short 'this is a bug' message, with the traceback only in the server log."""
    try:
        yield
    except ExplorerError as err:
        st.error(str(err), icon=":material/warning:")
    except Exception as exc:  # noqa: BLE001 - never show a traceback to the user
        if type(exc).__module__.startswith("streamlit"):  # rerun / stop control flow
            raise
        log.error("unexpected error %s\n%s", what, traceback.format_exc())
        st.error(f"Unexpected error{(' while ' + what) if what else ''}: "
                 f"{type(exc).__name__}: {exc}. This is a bug; the details are in the server "
                 "log. Try other settings or reload the page.", icon=":material/bug_report:")


def run_guarded(fn: Callable[[], Any], what: str = "") -> Any:
    with guard(what):
        return fn()
    return None

