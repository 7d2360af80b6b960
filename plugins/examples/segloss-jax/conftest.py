"""The repository's pytest run collects doctests everywhere under plugins/ (--doctest-modules,
--doctest-glob=*.md): collect this distribution's only where it is installed (with JAX)."""

from __future__ import annotations

import importlib.util
import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _installed(distribution: str) -> bool:
    """Installed metadata, not the ``*.egg-info`` a past ``pip install`` left in this directory."""
    return any(
        Path(str(dist.locate_file(""))).resolve() != HERE
        for dist in metadata.distributions()
        if (dist.metadata["Name"] or "").lower() == distribution
    )


if _installed("segloss-jax") and importlib.util.find_spec("jax") is not None:
    collect_ignore_glob: list[str] = []
else:
    collect_ignore_glob = ["*"]
    # pytest put this directory on sys.path to import this file: a stale egg-info here would make the
    # uninstalled plugin's entry point visible to segloss
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != HERE]
