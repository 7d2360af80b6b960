"""Entry point of the PyTorch backend (``torch = "segloss_torch.plugin"``).

Importing this module must stay cheap: torch is imported only when the backend is used.
"""

from __future__ import annotations

from collections.abc import Callable

from segloss_core import Backend, hookimpl

from .backend import TorchBackend


@hookimpl
def segloss_register_backends(register: Callable[[Backend], None]) -> None:
    register(TorchBackend())
