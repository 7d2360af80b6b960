"""The plugin module named by the entry point ``cldice = "segloss_cldice.plugin"``."""

from __future__ import annotations

from collections.abc import Callable

from segloss_core import LossSpec, hookimpl

from .loss import SPECS


@hookimpl
def segloss_register_losses(register: Callable[[LossSpec], None]) -> None:
    for spec in SPECS:
        register(spec)
