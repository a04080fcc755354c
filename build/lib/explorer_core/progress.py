"""One progress report for every long job: catalog builds, attribution, explanations,
evaluations, sweeps, studies.

A long job takes ``progress: ProgressFn | None`` and calls it with a :class:`Progress` now and
then (at least every few seconds of work where it can). The app turns it into one progress bar,
the command lines into one ``tqdm`` bar; tests record them. A job made of stages reports each
stage's own ``done``/``total``; :class:`Meter` computes rates and ETAs, and :func:`substage`
maps a sub-job's progress into a slice of its parent's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

__all__ = ["Progress", "ProgressFn", "Meter", "substage", "report"]


@dataclass(frozen=True)
class Progress:
    """Where a long job stands.

    Attributes
    ----------
    stage : str
        What runs now, in a few words (``"index"``, ``"attribution"``, ``"nmf"``, ``"done"``).
    done, total : float
        Units finished and in all (``total == 0``: unknown).
    unit : str
        What is counted (``"images"``, ``"classes"``, ``"pairs"``).
    rate : float
        Units per second so far (0 when unknown).
    eta_s : float | None
        Seconds left, when they can be estimated.
    message : str
        A short free text for the user (optional).
    """

    stage: str
    done: float = 0.0
    total: float = 0.0
    unit: str = ""
    rate: float = 0.0
    eta_s: float | None = None
    message: str = ""

    @property
    def fraction(self) -> float:
        """``done / total`` clipped to [0, 1] (0 when the total is unknown)."""
        return min(1.0, max(0.0, self.done / self.total)) if self.total > 0 else 0.0

    def text(self) -> str:
        """One line for a progress bar: ``stage: 12/40 images, 3.1 images/s, ETA 9 s``."""
        parts = [self.stage]
        if self.total > 0:
            parts.append(f"{self.done:g}/{self.total:g} {self.unit}".rstrip())
        if self.rate > 0:
            parts.append(f"{self.rate:.3g} {self.unit or 'units'}/s")
        if self.eta_s is not None and self.eta_s > 0:
            parts.append(f"ETA {_duration(self.eta_s)}")
        if self.message:
            parts.append(self.message)
        return parts[0] + (": " + ", ".join(parts[1:]) if len(parts) > 1 else "")


ProgressFn = Callable[[Progress], None]
"""The one callback signature of every long job."""


def _duration(s: float) -> str:
    s = int(round(s))
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def report(progress: ProgressFn | None, stage: str, done: float = 0.0, total: float = 0.0,
           unit: str = "", message: str = "") -> None:
    """Call ``progress`` (when given) with a plain :class:`Progress` (no rate)."""
    if progress is not None:
        progress(Progress(stage, float(done), float(total), unit, message=message))


class Meter:
    """Measures a stage's rate and ETA and reports it.

    ``meter = Meter(progress, "index", total=300, unit="images")``; ``meter.update(done)``
    after each piece of work (reports at most every ``min_interval`` seconds, and always on the
    last unit); ``meter.start_at(done)`` marks units that were already done (a resumed build) so
    they do not inflate the rate."""

    def __init__(self, progress: ProgressFn | None, stage: str, total: float,
                 unit: str = "", min_interval: float = 0.5) -> None:
        self.progress, self.stage, self.total, self.unit = progress, stage, float(total), unit
        self.min_interval = min_interval
        self.t0 = time.perf_counter()
        self.base = 0.0
        self.done = 0.0
        self._last = -1e9

    def start_at(self, done: float) -> None:
        self.base = self.done = float(done)
        self.t0 = time.perf_counter()

    @property
    def rate(self) -> float:
        el = time.perf_counter() - self.t0
        return (self.done - self.base) / el if el > 0 and self.done > self.base else 0.0

    def current(self, message: str = "") -> Progress:
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 and self.total > 0 else None
        return Progress(self.stage, self.done, self.total, self.unit, rate, eta, message)

    def update(self, done: float, message: str = "", force: bool = False) -> None:
        self.done = float(done)
        if self.progress is None:
            return
        now = time.perf_counter()
        last = self.total > 0 and self.done >= self.total
        if force or last or now - self._last >= self.min_interval:
            self._last = now
            self.progress(self.current(message))

    def advance(self, n: float = 1.0, message: str = "") -> None:
        self.update(self.done + n, message)


def substage(progress: ProgressFn | None, stage: str | None = None) -> ProgressFn | None:
    """A callback that relabels a sub-job's reports with ``stage`` (``None``: keep the sub-job's
    own stage names); ``None`` when ``progress`` is ``None``."""
    if progress is None:
        return None
    if stage is None:
        return progress

    def relabel(p: Progress) -> None:
        progress(replace(p, stage=stage))

    return relabel
