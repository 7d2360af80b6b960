"""Backend conformance suite, driven by the loss specs (usable by third-party plugin authors).

>>> from segloss_core.conformance import check_backend
>>> report = check_backend("numpy", losses=["dice"], quick=True)
>>> report.ok
True
"""

from __future__ import annotations

from .cases import INPUT_KINDS, Case, generate, make_arrays, materialise
from .check import Outcome, Report, check_backend, check_case, round_to_dtype

__all__ = [
    "INPUT_KINDS",
    "Case",
    "Outcome",
    "Report",
    "check_backend",
    "check_case",
    "generate",
    "make_arrays",
    "materialise",
    "round_to_dtype",
]
