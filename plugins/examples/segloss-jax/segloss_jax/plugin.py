"""The plugin module named by the entry point ``jax = "segloss_jax.plugin"``.

Registering imports nothing heavy: JAX is imported when the backend is first asked whether
it is available (``JaxBackend.availability``) or builds a loss.
"""

from __future__ import annotations

from collections.abc import Callable

from segloss_core import Backend, hookimpl

from .backend import JaxBackend


@hookimpl
def segloss_register_backends(register: Callable[[Backend], None]) -> None:
    register(JaxBackend())
