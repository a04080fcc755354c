"""The app's one progress view: :class:`~explorer_core.progress.Progress` reports drawn as a
``st.progress`` bar with the stage, counts, rate and ETA, where the user started the job."""

from __future__ import annotations

import time
from typing import Any

import streamlit as st

from explorer_core.progress import Progress


class ProgressBar:
    """Pass it as ``progress=`` to any long job; :meth:`done` removes the bar.

    ``container`` is where the bar goes (default: the current position in the page), so the bar
    shows next to the button that started the job."""

    def __init__(self, title: str, container: Any = None) -> None:
        self.title = title
        self.t0 = time.perf_counter()
        self.bar = (container or st).progress(0.0, text=f"{title} …")

    def __call__(self, p: Progress) -> None:
        el = time.perf_counter() - self.t0
        self.bar.progress(p.fraction, text=f"{self.title} — {p.text()} ({el:.0f} s)")

    def done(self) -> None:
        self.bar.empty()
