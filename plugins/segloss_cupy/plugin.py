"""Entry point of the CuPy backend (``cupy = "segloss_cupy.plugin"``)."""

from __future__ import annotations

from collections.abc import Callable

from segloss_core import Backend, hookimpl

from .backend import CupyBackend


@hookimpl
def segloss_register_backends(register: Callable[[Backend], None]) -> None:
    register(CupyBackend())
