"""Kernel sources shipped as package data (``segloss_csrc``): framework-free kernels
(``kernels/``), framework-free CUDA launchers (``cuda/``) and the PyTorch glue with the CPU
launchers (``torch/``). Backends compile them on the user's machine."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def source_dir() -> Path:
    """Directory holding the kernel sources (inside the installed package)."""
    return Path(str(resources.files(__name__)))
