"""The plan executor: the one loop that runs a :class:`~segloss_core.spec.LossPlan` on any backend.

A loss is a weighted sum of terms. For each activation of the plan (one, unless a compound mixes
them) the executor

1. gives the validated inputs the per-voxel fields its terms need (``spec.fields``: distance maps, …);
2. asks the backend's :class:`Kernels` once for every statistic the group's terms need;
3. lets the backend share them (:meth:`Kernels.share`: the all-gather of ``distributed=True``);
4. calls each term's ``spec.from_statistics(kernels.namespace, stats, params)``, times its weight;
   a term with ``reduction="none"`` and an ``element_map`` (cross-entropy, focal) gets its
   per-element values instead, from the per-voxel terms (:meth:`Kernels.elements`), not from sums;

then adds the voxelwise terms (:meth:`Kernels.voxelwise`), times their weights. A backend supplies
only the kernels; differentiation is the framework's (torch, JAX autograd) or the tape's
(:class:`segloss_core.reference.evaluate.TapeKernels` for NumPy and CuPy). The loop is plain Python over the plan's
static structure, so ``torch.compile(fullgraph=True)`` and ``jax.jit`` trace it without breaks.

>>> import numpy as np
>>> from segloss_core import get_loss
>>> from segloss_core.executor import required_statistics
>>> sorted(required_statistics(get_loss("dice_ce", backend="numpy").plan))
['ce_pos', 'intersection', 'pred_sum', 'target_sum']
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from .spec import LossPlan, LossSpec, Params, PlanTerm
from .statistics import SHAPE_STATISTICS
from .validation import PreparedInputs

Array = Any

__all__ = ["Kernels", "TermWeights", "required_elements", "required_statistics", "run_plan", "with_fields"]


def _in_group(term: PlanTerm, activation: str | None) -> bool:
    return term.spec.kind == "statistics" and activation in (None, term.params.get("activation", "none"))


def _term_statistics(plan: LossPlan, activation: str | None) -> frozenset[str]:
    names: set[str] = set()
    for term in plan.terms:
        if _in_group(term, activation) and not term.spec.uses_element_map(term.params):
            assert term.spec.required_statistics is not None
            names |= term.spec.required_statistics(term.params)
    return frozenset(names)


def required_statistics(plan: LossPlan, activation: str | None = None) -> frozenset[str]:
    """Statistics the plan's terms ask the kernels for (those with ``activation`` only, when given);
    terms that return an element map (``reduction="none"``) need per-voxel terms instead
    (:func:`required_elements`), and the executor adds ``statistics.SHAPE_STATISTICS`` itself."""
    return frozenset(n for n in _term_statistics(plan, activation) if n not in SHAPE_STATISTICS)


def required_elements(plan: LossPlan, activation: str | None = None) -> frozenset[str]:
    """Statistics whose per-voxel terms the plan's element-map terms need (:class:`~segloss_core.spec.ElementMap`)."""
    names: set[str] = set()
    for term in plan.terms:
        if _in_group(term, activation) and term.spec.uses_element_map(term.params):
            assert term.spec.element_map is not None
            names |= term.spec.element_map.statistics(term.params)
    return frozenset(names)


def with_fields(
    plan: LossPlan, prepared: PreparedInputs, activation: str, inputs: Mapping[str, Array]
) -> PreparedInputs:
    """``prepared`` with the fields the plan's terms of this activation need (distance maps, …)."""
    fields: dict[str, Array] = {}
    for term in plan.terms:
        if term.spec.fields is not None and term.params.get("activation", "none") == activation:
            for name, value in term.spec.fields(prepared, term.params, inputs).items():
                if name in fields and fields[name] is not value:
                    raise ValueError(
                        f"loss {plan.name!r}: two terms need different fields named {name!r}; combine them with "
                        "segloss_core.compound and the same distance-map parameters"
                    )
                fields[name] = value
    return replace(prepared, fields=fields) if fields else prepared


class Kernels:
    """What a backend supplies to :func:`run_plan`: its formula namespace and its kernels.

    ``namespace`` is the array-API namespace the formulas run on (``array_api_compat.torch``,
    ``jax.numpy``, the reference's tape). Subclasses implement :meth:`statistics`; for
    ``array_forward`` losses they set ``operators`` (``max_pool``/``min_pool``, see
    :mod:`segloss_core.operators`) and implement :meth:`voxels`; other voxelwise losses need their
    own :meth:`voxelwise`.
    """

    namespace: Any = None
    operators: Any = None

    def statistics(self, prepared: PreparedInputs, names: frozenset[str]) -> Mapping[str, Array]:
        """Each statistic in ``names`` (``segloss_core.statistics``), shape (B, C), from inputs whose
        ``fields`` hold what the field statistics name."""
        raise NotImplementedError

    def with_fields(
        self, plan: LossPlan, prepared: PreparedInputs, activation: str, inputs: Mapping[str, Array]
    ) -> PreparedInputs:
        """``prepared`` with the fields its group's terms need (:func:`with_fields`: distance maps);
        a backend that traces (``jax.jit``) computes them beforehand and returns ``prepared``."""
        return with_fields(plan, prepared, activation, inputs)

    def elements(self, prepared: PreparedInputs, names: frozenset[str]) -> Mapping[str, Array]:
        """The per-voxel terms of the statistics in ``names``, each w·term of shape (B, C, N) with an
        exact 0 where w == 0 (what :meth:`statistics` sums over N): the element maps of
        ``reduction="none"``."""
        raise NotImplementedError("these kernels do not compute element maps (reduction='none')")

    def share(self, stats: Mapping[str, Array]) -> Mapping[str, Array]:
        """The statistics the formulas see: these by default; the global batch's under DDP."""
        return stats

    def voxels(self, prepared: PreparedInputs) -> tuple[Array, Array, Array]:
        """(p, g, w): the activation and the target (B, C, N), the voxel weights (B|1, 1|C, N)."""
        raise NotImplementedError

    def voxelwise(self, spec: LossSpec, prepared: PreparedInputs, params: Params, inputs: Mapping[str, Array]) -> Array:
        """The value of a voxelwise term: ``spec.array_forward`` on :meth:`voxels` with ``operators``
        (a backend with its own voxelwise losses overrides this for them)."""
        if spec.array_forward is None or self.operators is None:
            raise NotImplementedError(f"these kernels do not compute voxelwise loss {spec.name!r}")
        xp = self.namespace
        p, g, w = self.voxels(prepared)
        shape = tuple(int(n) for n in prepared.pred.shape)
        w = xp.broadcast_to(
            xp.reshape(w, (int(w.shape[0]), int(w.shape[1]), *shape[2:])), (shape[0], *w.shape[1:2], *shape[2:])
        )
        return spec.array_forward(xp, self.operators, xp.reshape(p, shape), xp.reshape(g, shape), w, params)


def _weighted(value: Array, weight: float) -> Array:
    return value if weight == 1.0 else value * weight


def _add(xp: Any, plan: LossPlan, total: Array, value: Array) -> Array:
    """total + value; with ``reduction="none"`` a term's (B, C) values broadcast over the spatial
    axes of another's (B, C, *spatial) map, as MONAI's DiceFocalLoss(reduction="none") adds them."""
    if total is None:
        return value
    a, b = tuple(int(n) for n in total.shape), tuple(int(n) for n in value.shape)
    if a != b:
        short, long = (a, b) if len(a) < len(b) else (b, a)
        if len(short) == len(long) or long[: len(short)] != short:
            raise ValueError(
                f"loss {plan.name!r}: its terms' reduction='none' values have shapes {a} and {b}, which do not "
                "add up element by element; use reduction='mean' or 'sum'"
            )
        pad = (1,) * (len(long) - len(short))
        total, value = (xp.reshape(total, a + pad), value) if len(a) < len(b) else (total, xp.reshape(value, b + pad))
    return total + value


def _element_map(term: PlanTerm, kernels: Kernels, group: PreparedInputs, elements: Mapping[str, Array]) -> Array:
    """A term's ``reduction="none"`` map, (B, [K,] *spatial)."""
    assert term.spec.element_map is not None
    value = term.spec.element_map.combine(kernels.namespace, elements, term.params)
    return kernels.namespace.reshape(value, (*(int(n) for n in value.shape[:-1]), *group.spatial_shape))


def run_plan(
    plan: LossPlan,
    prepared: Mapping[str, PreparedInputs],
    kernels: Kernels,
    inputs: Mapping[str, Array] | None = None,
    weights: Sequence[float] | None = None,
) -> Array:
    """The loss value: Σ_terms weight · term, computed with ``kernels``.

    ``prepared`` holds the validated inputs per activation of the plan
    (``validate_inputs(..., activation=a)`` for each ``a`` in ``plan.activations``); ``weights``
    (one per term) default to the plan's (see :class:`TermWeights`).
    """
    inputs = inputs or {}
    xp = kernels.namespace
    weights = [t.weight for t in plan.terms] if weights is None else weights
    total: Array = None
    for activation, group in prepared.items():
        names = required_statistics(plan, activation)
        element_names = required_elements(plan, activation)
        assert names or not _term_statistics(plan, activation), "shape statistics come with kernel ones"
        if not names and not element_names:
            continue
        group = kernels.with_fields(plan, group, activation, inputs)
        stats = dict(kernels.statistics(group, names)) if names else {}
        if "voxels" in _term_statistics(plan, activation):
            like = stats[min(names)]
            stats["voxels"] = xp.full_like(like, float(math.prod(group.spatial_shape)))
        stats = kernels.share(stats) if stats else stats
        elements = kernels.elements(group, element_names) if element_names else {}
        for index, term in enumerate(plan.terms):
            if not _in_group(term, activation):
                continue
            if term.spec.uses_element_map(term.params):
                value = _element_map(term, kernels, group, elements)
            else:
                assert term.spec.from_statistics is not None
                value = term.spec.from_statistics(xp, stats, term.params)
            total = _add(xp, plan, total, _weighted(value, weights[index]))
    for index, term in enumerate(plan.terms):
        if term.spec.kind != "voxelwise":
            continue
        group = prepared[term.params.get("activation", "none")]
        value = _weighted(kernels.voxelwise(term.spec, group, term.params, inputs), weights[index])
        total = _add(xp, plan, total, value)
    assert total is not None, f"loss {plan.name!r} has no terms"
    return total


class TermWeights:
    """The term weights of a built loss (mixin): ``term_weights[i]`` weighs ``plan.terms[i]``.

    They start as the plan's weights; :meth:`set_weights` changes them by loss name (schedules such
    as :class:`~segloss_core.schedules.RebalanceSchedule`). The plan itself never changes, so
    ``loss.plan.describe()`` always shows the weights the loss was built with.
    """

    plan: LossPlan
    term_weights: list[float]

    def _init_weights(self, plan: LossPlan) -> None:
        self.plan = plan
        self.term_weights = [t.weight for t in plan.terms]

    def set_weights(self, **weights: float) -> None:
        """Change the weight of terms by loss name, e.g. ``set_weights(boundary=0.05)``."""
        names = [t.spec.name for t in self.plan.terms]
        for name, value in weights.items():
            if names.count(name) != 1:
                raise ValueError(
                    f"loss {self.plan.name!r} has {names.count(name)} terms named {name!r}; terms: {names}"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"weight of {name!r} must be a non-negative number, got {value!r}")
        for name, value in weights.items():
            self.term_weights[names.index(name)] = float(value)
