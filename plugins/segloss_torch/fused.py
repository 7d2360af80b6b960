"""Fused statistics through the C++/CUDA extension (see csrc/)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def status_line() -> str:
    return "not available (fused kernels not built in this version)"


def applicable(names: Iterable[str], plan: Any, prepared: Any) -> bool:
    return False


def require(names: Iterable[str], plan: Any) -> None:
    raise NotImplementedError("impl='fused' is not available yet")


def compute_statistics(prepared: Any, names: Iterable[str]) -> Any:  # pragma: no cover
    raise NotImplementedError
