"""``SeglossLoss``: the ``torch.nn.Module`` every torch loss is.

Forward: validate the inputs (shared contract), compute the statistics the plan needs in
one pass (native torch ops or the fused kernels), apply each term's formula from
``segloss_core`` (array API, differentiated by autograd), add voxelwise terms.
"""

from __future__ import annotations

from typing import Any

import array_api_compat.torch as xp_torch
import torch
from torch import nn

from segloss_core.arrays import get_namespace
from segloss_core.reference.evaluate import required_statistics, with_fields
from segloss_core.spec import LossPlan
from segloss_core.validation import PreparedInputs, validate_inputs

from . import distributed, fused, native, voxelwise

get_namespace(torch.empty(0))  # memoise the namespace: torch.compile then traces a dict lookup only


class SeglossLoss(nn.Module):
    """A segloss loss for torch tensors: ``loss(pred, target, mask=None, **inputs)``.

    ``pred`` (B, C, *spatial) logits (float16/bfloat16/float32/float64), ``target`` integer
    labels (B, *spatial)/(B, 1, *spatial) or one-hot/soft targets (B, C, *spatial),
    ``mask`` optional voxel weights. Returns a float32 tensor for float16/bfloat16/float32
    inputs and float64 for float64.
    """

    def __init__(self, plan: LossPlan, impl: str = "auto", distributed: bool = False, process_group: Any = None):
        super().__init__()
        self.plan = plan
        self.impl = impl
        self.distributed = distributed
        self.process_group = process_group
        if distributed:
            voxelwise_terms = [t.spec.name for t in plan.terms if t.spec.kind == "voxelwise"]
            if voxelwise_terms:
                raise ValueError(
                    f"distributed=True shares per-class statistics; {voxelwise_terms} are not computed from "
                    "statistics (top-k, sorting) and cannot be made global this way"
                )
        self._statistics = required_statistics(plan)
        self._groups = {act: required_statistics(plan, act) for act in plan.activations}
        self._voxelwise = [t for t in plan.terms if t.spec.kind == "voxelwise"]
        self.term_weights: list[float] = [t.weight for t in plan.terms]
        if impl != "native" or any(n.startswith("field_") for n in self._statistics):
            fused.prepare()  # build and load the kernels now, never inside forward (torch.compile traces it)
        if impl == "fused":  # field statistics (distance maps) are always computed apart
            fused.require(frozenset(n for n in self._statistics if not n.startswith("field_")), plan)

    def set_weights(self, **weights: float) -> None:
        """Change the weight of terms by loss name, e.g. ``set_weights(boundary=0.05)`` (schedules)."""
        names = [t.spec.name for t in self.plan.terms]
        for name, value in weights.items():
            if names.count(name) != 1:
                raise ValueError(
                    f"loss {self.plan.name!r} has {names.count(name)} terms named {name!r}; terms: {names}"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"weight of {name!r} must be a non-negative number, got {value!r}")
            self.term_weights[names.index(name)] = float(value)

    @property
    def name(self) -> str:
        return self.plan.name

    def extra_repr(self) -> str:
        extra = ", distributed=True" if self.distributed else ""
        return f"{self.plan.describe()}, impl={self.impl!r}{extra}"

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["process_group"] = None  # process groups do not pickle; the default group is used
        return state

    def implementation(self, prepared: PreparedInputs | None = None, names: frozenset[str] | None = None) -> str:
        """Which statistics implementation a call with ``prepared`` inputs uses."""
        names = self._statistics if names is None else names
        if self.impl == "native" or not names:
            return "native"
        if self.impl == "fused":
            return "fused"
        return "fused" if fused.applicable(names, self.plan, prepared) else "native"

    def _compute_statistics(self, group: PreparedInputs, names: frozenset[str]) -> dict[str, torch.Tensor]:
        """The fused kernels for what they cover, the native path for the rest (e.g. field sums)."""
        if self.impl == "native":
            return native.compute_statistics(group, names)
        fusable = frozenset(n for n in names if fused.fusable([n]))
        rest = names - fusable
        if rest and self.impl == "auto" and fusable <= {"count", "target_sum"}:
            return native.compute_statistics(group, names)  # nothing worth a separate fused pass
        stats: dict[str, torch.Tensor] = {}
        if fusable:
            if self.implementation(group, fusable) == "fused":
                stats.update(fused.compute_statistics(group, fusable))
            else:
                rest = names
        if rest:
            stats.update(native.compute_statistics(group, rest))
        return stats

    def _validate(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, inputs: dict[str, Any]
    ) -> dict[str, PreparedInputs]:
        unknown = sorted(set(inputs) - set(self.plan.call_inputs))
        if unknown:
            raise TypeError(
                f"loss {self.plan.name!r} got unexpected call argument(s) {unknown}; it accepts "
                f"(pred, target, {', '.join(self.plan.call_inputs)})"
            )
        if not isinstance(pred, torch.Tensor):
            raise TypeError(f"pred must be a torch.Tensor for backend 'torch', got {type(pred).__name__}")
        check = not _compiling()
        return {
            act: validate_inputs(pred, target, mask, self.plan, check_label_values=check, activation=act)
            for act in self.plan.activations
        }

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, **inputs: Any):
        shared = self.distributed and distributed.available(self.process_group)
        if shared:  # every rank learns whether every rank's input passed, before any statistics move
            prepared = distributed.validate_on_every_rank(
                lambda: self._validate(pred, target, mask, inputs), self.process_group
            )
        else:
            prepared = self._validate(pred, target, mask, inputs)
        total: torch.Tensor | None = None
        for activation, names in self._groups.items():
            if not names:
                continue
            group = with_fields(self.plan, prepared[activation], activation, inputs)
            stats = self._compute_statistics(group, names)
            if shared:
                stats = distributed.gather_statistics(stats, self.process_group)
            for index, term in enumerate(self.plan.terms):
                if term.spec.kind != "statistics" or term.params.get("activation", "none") != activation:
                    continue
                value = term.spec.from_statistics(xp_torch, stats, term.params)
                weight = self.term_weights[index]
                value = value if weight == 1.0 else value * weight
                total = value if total is None else total + value
        for term in self._voxelwise:
            group = prepared[term.params.get("activation", "none")]
            value = voxelwise.evaluate(term.spec, group, term.params, inputs)
            weight = self.term_weights[self.plan.terms.index(term)]
            value = value if weight == 1.0 else value * weight
            total = value if total is None else total + value
        assert total is not None
        return total


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False
