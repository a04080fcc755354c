"""The intruder-detection study (paper App. C): study storage in DuckDB, seeded trials, signed
participant links and results with confidence intervals. It sits above the method
(:mod:`explainer` computes the concepts whose crops the trials show) and below the app.

Everything public lives in :mod:`study.intruder` and is re-exported here.
"""

from . import intruder
from .intruder import *  # noqa: F403 - the public names are intruder.__all__

__all__ = list(intruder.__all__)
