"""``SeglossLoss``: the ``torch.nn.Module`` every torch loss is.

Forward: validate the inputs (shared contract), then the core's plan executor
(:func:`segloss_core.executor.run_plan`) with this module's kernels: statistics in one pass
(native torch ops or the fused kernels), shared across ranks with ``distributed=True``, the
voxelwise losses of :mod:`segloss_torch.voxelwise`; autograd differentiates all of it.
"""

from __future__ import annotations

from typing import Any

import array_api_compat.torch as xp_torch
import torch
from torch import nn

from segloss_core.arrays import get_namespace
from segloss_core.executor import Kernels, TermWeights, required_statistics, run_plan
from segloss_core.spec import LossPlan, LossSpec, Params
from segloss_core.validation import PreparedInputs, validate_inputs

from . import distributed, elements, fused, native, voxelwise

get_namespace(torch.empty(0))  # memoise the namespace: torch.compile then traces a dict lookup only


class SeglossLoss(TermWeights, nn.Module):
    """A segloss loss for torch tensors: ``loss(pred, target, mask=None, **inputs)``.

    ``pred`` (B, C, *spatial) logits (float16/bfloat16/float32/float64), ``target`` integer
    labels (B, *spatial)/(B, 1, *spatial) or one-hot/soft targets (B, C, *spatial),
    ``mask`` optional voxel weights. Returns a float32 tensor for float16/bfloat16/float32
    inputs and float64 for float64.
    """

    def __init__(self, plan: LossPlan, impl: str = "auto", distributed: bool = False, process_group: Any = None):
        super().__init__()
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
        self._init_weights(plan)
        if impl != "native" or any(n.startswith("field_") for n in self._statistics):
            fused.prepare()  # build and load the kernels now, never inside forward (torch.compile traces it)
        if impl == "fused":
            fused.require(self._statistics, plan)

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
        """The fused kernels for what they cover (field sums included), the native path for the rest."""
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
        return run_plan(self.plan, prepared, _TorchKernels(self, shared), inputs, self.term_weights)


class _TorchKernels(Kernels):
    """The kernels of a :class:`SeglossLoss` for the core's executor."""

    namespace = xp_torch
    operators = voxelwise.TorchOperators

    def __init__(self, loss: SeglossLoss, shared: bool):
        self.loss = loss
        self.shared = shared  # distributed=True with torch.distributed initialised

    def statistics(self, prepared: PreparedInputs, names: frozenset[str]) -> dict[str, torch.Tensor]:
        return self.loss._compute_statistics(prepared, names)

    def elements(self, prepared: PreparedInputs, names: frozenset[str]) -> dict[str, torch.Tensor]:
        return elements.compute_elements(prepared, names)  # element maps: native under every impl

    def share(self, stats: Any) -> Any:
        return distributed.gather_statistics(stats, self.loss.process_group) if self.shared else stats

    def voxels(self, prepared: PreparedInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return voxelwise.voxels(prepared)

    def voxelwise(self, spec: LossSpec, prepared: PreparedInputs, params: Params, inputs: Any) -> torch.Tensor:
        if spec.name in voxelwise.IMPLEMENTATIONS:
            return voxelwise.evaluate(spec, prepared, params, inputs)
        return super().voxelwise(spec, prepared, params, inputs)  # array_forward, with TorchOperators


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False
