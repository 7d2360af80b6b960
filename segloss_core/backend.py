"""The backend interface: what a plugin implements to compute segloss losses.

A backend turns a :class:`~segloss_core.spec.LossPlan` (resolved, checked parameters)
into a loss object for its framework. It declares what it can do
(:meth:`Backend.supports`), reports whether it can run here
(:meth:`Backend.availability`), and gives the conformance suite a way to run its losses
on NumPy inputs (:meth:`Backend.run_for_conformance`). See ``docs/plugins.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .spec import API_VERSION, LossPlan, LossSpec, Param

__all__ = ["API_VERSION", "Backend", "ConformanceDtype"]


@dataclass(frozen=True)
class ConformanceDtype:
    """A dtype a backend wants checked, with its tolerances against the float64 reference."""

    name: str
    rtol: float
    atol: float


DEFAULT_DTYPES = (ConformanceDtype("float64", 1e-7, 1e-9), ConformanceDtype("float32", 2e-4, 2e-5))


class Backend:
    """Base class for backends. Subclasses set ``name`` and implement :meth:`build`.

    ``voxelwise_losses`` lists the names of voxelwise losses (those not computed from
    statistics) this backend implements; statistics-based and compound losses are
    supported by any backend that computes the statistics.
    """

    name: str = ""
    description: str = ""
    api_version: int = API_VERSION
    voxelwise_losses: frozenset[str] = frozenset()
    conformance_dtypes: tuple[ConformanceDtype, ...] = DEFAULT_DTYPES
    options: tuple[Param, ...] = ()
    """Backend options accepted by ``get_loss`` besides the loss parameters (e.g. torch's
    ``impl``); they must not share a name with any loss parameter."""
    operators: bool = False
    """True if the backend runs ``array_forward`` losses (it provides max_pool/min_pool, see
    segloss_core.operators)."""

    def availability(self) -> str | None:
        """``None`` if this backend can run here, else the reason it cannot (one line)."""
        return None

    def supports(self, spec: LossSpec) -> bool:
        """Whether :meth:`build` can build ``spec`` (for compound specs: all its terms)."""
        if spec.kind == "voxelwise":
            return spec.name in self.voxelwise_losses or (self.operators and spec.array_forward is not None)
        return True

    def build(self, plan: LossPlan, **options: Any) -> Any:
        """Return a loss object for ``plan``; called only if available and supported.

        ``options`` are the checked values of :attr:`options` (defaults filled in)."""
        raise NotImplementedError

    def prebuild(self) -> str | None:
        """Compile whatever the backend compiles lazily (``segloss build``); return a report
        line, or None if there is nothing to build. Must not raise for a failed build: report it
        with a line containing "NOT" ("kernels NOT built: <reason>"); ``segloss build`` then exits 1."""
        return None

    def distance_maps_for(self, array: Any) -> Any | None:
        """This backend's distance-map kernels for ``array``, or None (the default).

        Return an object (a module is fine) with ``signed_distance_map``, ``distance_map`` and
        ``mask_distance_map``, the signatures of :mod:`segloss_core.distance_maps` without
        ``reference`` (:class:`~segloss_core.distance_maps.DistanceMapKernels`), when ``array``
        belongs to this backend's library and the kernels can run here. The core asks every
        registered backend (through the registry) before it falls back to the scipy/cupyx
        reference. Must be cheap and must not raise for arrays of other libraries.
        """
        return None

    def status(self) -> Mapping[str, str]:
        """Extra facts shown by ``segloss backends``/``describe`` (e.g. active implementation)."""
        return {}

    # -- conformance -------------------------------------------------------------------
    def run_for_conformance(
        self,
        loss: Any,
        pred: np.ndarray,
        target: np.ndarray,
        mask: np.ndarray | None,
        dtype: str,
        inputs: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate ``loss`` (built by :meth:`build`) on NumPy inputs cast to ``dtype``.

        Return (value, d value / d pred) as float64 NumPy arrays. ``pred`` and ``mask`` are
        float64, ``target`` integer labels or float64 probabilities.
        """
        raise NotImplementedError(f"backend {self.name!r} does not implement run_for_conformance")

    def run_on_mismatched_devices(
        self, loss: Any, pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None, dtype: str
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """As :meth:`run_for_conformance`, but with ``target`` on another device than ``pred``.

        The input contract (``segloss_core.validation``) makes such a call raise ``ValueError``
        ("target is on device ... but pred is on ..."); the conformance case
        ``invalid-mismatched-devices`` checks that the backend's loss does. Return None (the
        default) where this backend cannot offer two devices here: the kit then reports the case
        "not applicable" instead of passing it. torch puts the target on the ``meta`` device, so
        the case runs on any machine.
        """
        return None
