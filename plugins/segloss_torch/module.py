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

from segloss_core.reference.evaluate import required_statistics
from segloss_core.spec import LossPlan
from segloss_core.validation import PreparedInputs, namespace_of, validate_inputs

from . import fused, native, voxelwise

namespace_of(torch.empty(0))  # memoise the namespace: torch.compile then traces a dict lookup only


class SeglossLoss(nn.Module):
    """A segloss loss for torch tensors: ``loss(pred, target, mask=None, **inputs)``.

    ``pred`` (B, C, *spatial) logits (float16/bfloat16/float32/float64), ``target`` integer
    labels (B, *spatial)/(B, 1, *spatial) or one-hot/soft targets (B, C, *spatial),
    ``mask`` optional voxel weights. Returns a float32 tensor for float16/bfloat16/float32
    inputs and float64 for float64.
    """

    def __init__(self, plan: LossPlan, impl: str = "auto"):
        super().__init__()
        self.plan = plan
        self.impl = impl
        self._statistics = required_statistics(plan)
        self._groups = {act: required_statistics(plan, act) for act in plan.activations}
        self._voxelwise = [t for t in plan.terms if t.spec.kind == "voxelwise"]
        if impl == "fused":
            fused.require(self._statistics, plan)

    @property
    def name(self) -> str:
        return self.plan.name

    def extra_repr(self) -> str:
        return f"{self.plan.describe()}, impl={self.impl!r}"

    def implementation(self, prepared: PreparedInputs | None = None, names: frozenset[str] | None = None) -> str:
        """Which statistics implementation a call with ``prepared`` inputs uses."""
        names = self._statistics if names is None else names
        if self.impl == "native" or not names:
            return "native"
        if self.impl == "fused":
            return "fused"
        return "fused" if fused.applicable(names, self.plan, prepared) else "native"

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, **inputs: Any):
        unknown = sorted(set(inputs) - set(self.plan.call_inputs))
        if unknown:
            raise TypeError(
                f"loss {self.plan.name!r} got unexpected call argument(s) {unknown}; it accepts "
                f"(pred, target, {', '.join(self.plan.call_inputs)})"
            )
        if not isinstance(pred, torch.Tensor):
            raise TypeError(f"pred must be a torch.Tensor for backend 'torch', got {type(pred).__name__}")
        check = not _compiling()
        prepared = {
            act: validate_inputs(pred, target, mask, self.plan, check_label_values=check, activation=act)
            for act in self.plan.activations
        }
        total: torch.Tensor | None = None
        for activation, names in self._groups.items():
            if not names:
                continue
            group = prepared[activation]
            if self.implementation(group, names) == "fused":
                stats = fused.compute_statistics(group, names)
            else:
                stats = native.compute_statistics(group, names)
            for term in self.plan.terms:
                if term.spec.kind != "statistics" or term.params.get("activation", "none") != activation:
                    continue
                value = term.spec.from_statistics(xp_torch, stats, term.params)
                value = value if term.weight == 1.0 else value * term.weight
                total = value if total is None else total + value
        for term in self._voxelwise:
            group = prepared[term.params.get("activation", "none")]
            value = voxelwise.evaluate(term.spec.name, group, term.params, inputs)
            value = value if term.weight == 1.0 else value * term.weight
            total = value if total is None else total + value
        assert total is not None
        return total


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False
