"""Hook specifications of the ``segloss`` plugin system (pluggy project ``segloss``).

A plugin is a module or object with functions decorated by :data:`segloss_core.hookimpl`,
made known through the entry-point group ``segloss`` in its distribution::

    [project.entry-points.segloss]
    mybackend = "my_package.segloss_plugin"

The entry point's name is the plugin's name (for a backend plugin, use the backend's name).
Hooks receive a ``register`` callback and call it once per object; they return nothing.
Built-in losses and backends use exactly these hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .backend import Backend
    from .spec import LossSpec

PROJECT = "segloss"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def segloss_register_losses(register: Callable[[LossSpec], None]) -> None:
    """Register loss specifications: call ``register(spec)`` for each :class:`~segloss_core.LossSpec`.

    A name that is already registered is refused (with a warning naming both plugins)
    unless the spec is registered with ``register(spec, override=True)``.
    """


@hookspec
def segloss_register_backends(register: Callable[[Backend], None]) -> None:
    """Register backends: call ``register(backend)`` for each :class:`~segloss_core.Backend`.

    Registering must be cheap and must not import heavy frameworks: a backend reports
    whether it can run in :meth:`~segloss_core.Backend.availability`, which is asked lazily.
    """
