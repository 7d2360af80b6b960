"""Deep supervision: one loss applied to every decoder output, weighted, at each output's spacing.

Each lower-resolution output covers the same physical extent with fewer voxels, so its voxel
size is the full-resolution one times the downsampling factor, axis by axis:
``spacing_i[d] = spacing[d] · full[d] / shape_i[d]``. A loss whose terms have a ``spacing``
parameter (boundary, hausdorff_dt, log_hausdorff_dt and compounds of them) is evaluated at each
level with that level's spacing (``spacing=None`` counts as 1 per full-resolution voxel), so a
distance term measures the same physical distances at every level.

Call inputs (``distance_map=``): a tensor at full resolution is **downsampled with the
target's nearest-exact resize**, not recomputed per level. Each coarse voxel then carries the
map value of the very full-resolution voxel whose label it took, so its sign agrees with the
downsampled target everywhere, and the values stay the exact distances (in physical units, like
the scaled spacing) to the full-resolution boundary, at no extra EDT; a map recomputed from the
coarse target would measure distances to that target's blockier boundary instead. A list (one
map per output) is passed through as given. Without ``distance_map=`` every level computes its
own map from its downsampled target at its own spacing.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segloss_core.deep_supervision import deep_supervision_weights
from segloss_core.distance_maps import check_spacing
from segloss_core.spec import LossPlan, PlanTerm

__all__ = ["DeepSupervisionLoss", "level_spacing", "resize_target"]


class DeepSupervisionLoss(nn.Module):
    """Σ_i w_i · loss_i(outputs[i], targets[i], masks[i], **inputs_i).

    ``outputs``: list of logits, highest resolution first. ``target``: one full-resolution
    target (integer labels or one-hot), resized to each output with nearest-exact
    interpolation (MONAI; nnU-Net downsamples in its data loader the same way), or a list
    of targets, one per output. ``mask`` and call inputs such as ``distance_map=`` are resized the
    same way (or given as lists). ``weights``: ``"nnunet"`` (1/2^i, lowest 0, normalised; with two
    outputs that is (1, 0), which warns), ``"exp"``, ``"same"``, ``"two"`` (MONAI modes) or explicit
    numbers. ``loss_i`` is ``loss`` with every ``spacing`` parameter scaled by level i's
    downsampling factor (module docstring); :meth:`set_weights` sets the term weights of
    ``loss`` (and so of every level), so ``RebalanceSchedule.apply(ds_loss, epoch)`` works.

    >>> from segloss_core import get_loss
    >>> ds = DeepSupervisionLoss(get_loss("dice_ce", backend="torch", preset="nnunet"), weights="nnunet")
    >>> outs = [torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2)]
    >>> float(ds(outs, torch.randint(0, 3, (1, 8, 8)))) != 0
    True
    """

    def __init__(self, loss: nn.Module, weights: str | Sequence[float] = "nnunet"):
        super().__init__()
        self.loss = loss
        self.weights = weights
        self._levels: dict[tuple[float, ...], nn.Module] = {}  # loss at a downsampling factor (not submodules)
        self._warned_zero_level = False

    def set_weights(self, **weights: float) -> None:
        """Set term weights of the wrapped loss by term name, e.g. ``set_weights(boundary=0.05)``
        (:meth:`segloss_core.executor.TermWeights.set_weights`); every level follows."""
        setter = getattr(self.loss, "set_weights", None)
        if setter is None:
            raise TypeError(f"the wrapped loss {type(self.loss).__name__} has no term weights (set_weights)")
        setter(**weights)

    def forward(
        self,
        outputs: Sequence[torch.Tensor],
        target: torch.Tensor | Sequence[torch.Tensor],
        mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
        **inputs: Any,
    ) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor) or not outputs:
            raise TypeError("outputs must be a non-empty list of tensors, highest resolution first")
        weights = deep_supervision_weights(len(outputs), self.weights)
        self._warn_if_a_level_is_unweighted(weights)
        targets = _per_level("target", target, outputs)
        reference = targets[0] if isinstance(target, (list, tuple)) else target  # the full-resolution grid
        full = tuple(int(s) for s in reference.shape[-(outputs[0].ndim - 2) :])
        masks = [None] * len(outputs) if mask is None else _per_level("mask", mask, outputs)
        per_input = {name: _per_level(name, value, outputs) for name, value in inputs.items()}
        total = None
        for i, (w, out, tgt, m) in enumerate(zip(weights, outputs, targets, masks, strict=True)):
            if w == 0:
                continue
            loss = self._loss_at(full, tuple(int(s) for s in out.shape[2:]))
            value = w * loss(out, tgt, m, **{name: values[i] for name, values in per_input.items()})
            total = value if total is None else total + value
        assert total is not None  # deep_supervision_weights refuses all-zero weights
        return total

    def _warn_if_a_level_is_unweighted(self, weights: tuple[float, ...]) -> None:
        if self.weights == "nnunet" and len(weights) == 2 and not self._warned_zero_level:
            self._warned_zero_level = True
            warnings.warn(
                "DeepSupervisionLoss(weights='nnunet') with 2 outputs gives weights (1, 0): nnU-Net drops the "
                "lowest-resolution output, so the second output gets weight 0 and is not supervised at all; pass "
                "weights='exp', 'two' or explicit numbers (e.g. (2/3, 1/3)) to supervise it",
                UserWarning,
                stacklevel=3,
            )

    def _loss_at(self, full: tuple[int, ...], shape: tuple[int, ...]) -> nn.Module:
        """``self.loss`` with each ``spacing`` parameter scaled from the ``full`` grid to ``shape``."""
        plan: LossPlan | None = getattr(self.loss, "plan", None)
        factors = tuple(f / s for f, s in zip(full, shape, strict=True))
        if plan is None or all(f == 1.0 for f in factors) or not any("spacing" in t.params for t in plan.terms):
            return self.loss
        level = self._levels.get(factors)
        if level is None:
            level = self._levels[factors] = _rebuilt(self.loss, _plan_at(plan, factors))
        level.term_weights = list(self.loss.term_weights)  # follow set_weights (schedules) on the full loss
        return level


def level_spacing(spacing: float | Sequence[float] | None, factors: Sequence[float]) -> tuple[float, ...]:
    """The voxel size of a level downsampled by ``factors`` (full / level size, per axis) from a grid
    of voxel size ``spacing`` (``None``: 1 per axis): ``spacing[d] · factors[d]``.

    >>> level_spacing((0.8, 0.8, 2.5), (2.0, 2.0, 1.0))
    (1.6, 1.6, 2.5)
    """
    base = check_spacing(spacing, len(factors))
    return tuple(s * f for s, f in zip(base, factors, strict=True))


def _plan_at(plan: LossPlan, factors: tuple[float, ...]) -> LossPlan:
    terms = tuple(
        PlanTerm(t.weight, t.spec, t.params.replace(spacing=level_spacing(t.params["spacing"], factors)))
        if "spacing" in t.params
        else t
        for t in plan.terms
    )
    return LossPlan(plan.name, terms, plan.preset)


def _rebuilt(loss: nn.Module, plan: LossPlan) -> nn.Module:
    from .module import SeglossLoss

    if not isinstance(loss, SeglossLoss):
        raise TypeError(f"cannot rebuild {type(loss).__name__} at another spacing (only segloss torch losses)")
    return SeglossLoss(plan, impl=loss.impl, distributed=loss.distributed, process_group=loss.process_group)


def _per_level(name: str, value: Any, outputs: Sequence[torch.Tensor]) -> list[Any]:
    """``value`` for each output: a list as given (one per output), a tensor resized to each."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(outputs):
            raise ValueError(f"got {len(value)} entries of {name} for {len(outputs)} outputs")
        return list(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or a list of tensors (one per output), got {type(value).__name__}")
    return [resize_target(value, o) for o in outputs]


def resize_target(target: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``target`` resized to ``output``'s spatial size with nearest-exact interpolation."""
    spatial = tuple(output.shape[2:])
    has_channel = target.ndim == output.ndim
    if tuple(target.shape[-len(spatial) :]) == spatial:
        return target
    x = target if has_channel else target.unsqueeze(1)
    resized = F.interpolate(
        x.to(torch.float32 if not x.is_floating_point() else x.dtype), size=spatial, mode="nearest-exact"
    )
    resized = resized.to(target.dtype)
    return resized if has_channel else resized.squeeze(1)
