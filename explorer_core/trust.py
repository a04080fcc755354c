"""Where the user's own model code may run (``python:`` model specs; :mod:`explorer_core.models`).

Importing a user's model file runs its code with this process's rights, so it happens only where
a person asked for it. The permission lives in a :class:`contextvars.ContextVar`: it holds for the
current thread (or asyncio task) only and starts empty in every new thread.

* The command lines wrap their whole run in :func:`user_code_allowed` (every file: the user typed
  the spec, or names a workspace of their own).
* The app calls :func:`set_code_trust` at the start of every page run with exactly the files this
  browser session confirmed on the Workspace page ("I trust <file>: load it"); Streamlit runs each
  session's script in its own thread, so one session's trust never serves another, and a link
  naming a workspace never runs its code.
* Library callers pass ``allow_code=True`` to :func:`~explorer_core.models.load_model`.

No torch import here: the command lines import it before parsing their arguments.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import ExplorerError

__all__ = ["UserCodeRefused", "code_path", "code_trusted", "set_code_trust", "user_code_allowed"]

_CODE_TRUST: contextvars.ContextVar[bool | frozenset[str]] = contextvars.ContextVar(
    "explorer_code_trust", default=frozenset())


class UserCodeRefused(ExplorerError):
    """A ``python:`` spec was to be loaded where nobody allowed running its file's code."""


def code_path(path: str | os.PathLike) -> str:
    """The form a code file is trusted under: absolute, ``~`` expanded, symlinks resolved."""
    return str(Path(os.path.expanduser(os.fspath(path))).resolve())


@contextlib.contextmanager
def user_code_allowed(files: Iterable[str] | None = None) -> Iterator[None]:
    """Within the block (this thread / task), ``python:`` specs may run the code of every file
    (``files=None``) or of the given files only. The previous state is restored on exit."""
    trust: bool | frozenset[str] = True if files is None else frozenset(map(code_path, files))
    token = _CODE_TRUST.set(trust)
    try:
        yield
    finally:
        _CODE_TRUST.reset(token)


def set_code_trust(files: Iterable[str]) -> None:
    """Allow the code of exactly ``files`` for the rest of the current context (the app, at the
    start of each page run: the files its browser session confirmed)."""
    _CODE_TRUST.set(frozenset(map(code_path, files)))


def code_trusted(path: str | os.PathLike) -> bool:
    """Whether the code of ``path`` may run in the current context."""
    trust = _CODE_TRUST.get()
    return trust is True or (isinstance(trust, frozenset) and code_path(path) in trust)
