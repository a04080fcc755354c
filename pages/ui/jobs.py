"""Long jobs in the app: an estimate before starting, progress that moves (stage, count, rate,
ETA, elapsed) next to the button that started the job, and a Cancel button.

Cancel: a click while the job runs makes Streamlit stop the running script at the job's next
progress report (the job unwinds through its own ``finally``/rollback: a catalog build keeps
its saved chunks and resumes); the click's callback marks the job cancelled, so the next run
says so instead of starting it again. Outside Streamlit's interruption (a thread, a test) the
same mark makes the progress callback raise :class:`~explorer_core.errors.Cancelled`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import streamlit as st

from explorer_core.errors import Cancelled
from explorer_core.progress import Progress

# Measured throughput per (job kind, model) on this server: the rate of the stage that
# processes images (a build's forward passes, an explanation's attributions), the estimate shown
# before the next job of that kind. One float per kind and model, at most _MAX_RATES: bounded.
_RATES: dict[tuple[str, str], float] = {}
_MAX_RATES = 256


def duration(s: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 10 min``."""
    s = int(round(max(0.0, s)))
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def record_rate(kind: str, model: str, rate: float) -> None:
    """Remember the images/s a job of ``kind`` on ``model`` reached."""
    if rate > 0:
        if len(_RATES) >= _MAX_RATES and (kind, model) not in _RATES:
            _RATES.pop(next(iter(_RATES)))
        _RATES[(kind, model)] = float(rate)


def estimate(kind: str, model: str, units: float, unit: str = "images") -> str | None:
    """"up to about 40 s for 500 images (12.5 images/s measured on this server)", or None
    before a job of this kind and model processed images here. 'Up to': parts stored in the
    workspace's cache (a class's attributions, a build's saved chunks) are not done again."""
    rate = _RATES.get((kind, model))
    if not rate or units <= 0:
        return None
    return (f"up to about {duration(units / rate)} for {units:g} {unit} ({rate:.3g} {unit}/s "
            "measured on this server)")


def cancel_flag(key: str) -> str:
    return f"{key}_cancelled"


def was_cancelled(key: str) -> bool:
    """Whether the job ``key`` was cancelled (the mark is consumed)."""
    return bool(st.session_state.pop(cancel_flag(key), False))


class Job:
    """A progress view for one long job; pass it as ``progress=``. Shows the bar and a Cancel
    button in a placeholder at the current position (or in ``container``); :meth:`done` removes
    both, also after an error."""

    def __init__(self, title: str, key: str, *, container: Any = None,
                 on_cancel: Callable[[], None] | None = None, kind: str = "",
                 model: str = "", units: float = 0.0) -> None:
        self.title, self.key = title, key
        self.kind, self.model, self.units = kind, model, float(units)
        self.t0 = time.perf_counter()
        self.last: Progress | None = None
        self.rate = 0.0
        st.session_state.pop(cancel_flag(key), None)
        self.slot = (container or st).empty()
        with self.slot.container():
            c1, c2 = st.columns([6, 1], vertical_alignment="center")
            self.bar = c1.progress(0.0, text=f"{title} …")

            def mark() -> None:
                st.session_state[cancel_flag(key)] = True
                if on_cancel is not None:
                    on_cancel()

            c2.button("Cancel", key=f"{key}_cancel", on_click=mark,
                      help="Stop the job; what is saved stays (a build resumes later)")

    def text(self, p: Progress) -> str:
        el = time.perf_counter() - self.t0
        return f"{self.title} — {p.text()} · {duration(el)} elapsed"

    def __call__(self, p: Progress) -> None:
        if st.session_state.get(cancel_flag(self.key)):
            raise Cancelled(f"{self.title} cancelled; what was saved is kept, start it again "
                            "to resume")
        self.last = p
        if p.unit == "images" and p.rate > 0 and p.stage != "done":
            self.rate = p.rate  # the image stage's own rate (Meter), not cache hits
        self.bar.progress(p.fraction, text=self.text(p))

    def finished(self) -> None:
        """The job completed: remember its image rate for the next estimate."""
        if self.kind and self.rate > 0:
            record_rate(self.kind, self.model, self.rate)

    def done(self) -> None:
        self.slot.empty()
