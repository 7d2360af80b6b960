"""segloss-jax: a JAX backend for segloss, installed as a separate distribution.

>>> from segloss_core import list_backends
>>> "jax" in [b.name for b in list_backends()]
True
"""

from __future__ import annotations

from .backend import JaxBackend

__all__ = ["JaxBackend"]
