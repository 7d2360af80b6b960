"""Distance losses at the sizes of issue 17, against their peers, on smooth blobs (``common.loss_inputs``).

- ``boundary_precomputed`` at 2×4×128³: segloss's boundary loss with the map given
  (``distance_map=``, computed once in setup, as ``segloss distmap`` would) against the LIVIAETS
  boundary-loss form ``einsum("bkxyz,bkxyz->bkxyz", softmax(x)[:, idc], φ[:, idc]).mean()``
  (SurfaceLoss, idc the foreground classes);
- ``boundary_on_the_fly`` at 2×4×128³: the boundary loss computing φ from the labels every step,
  against the fused Dice+CE step it is added to in training (``dice_ce-fused``; issue 17: the
  boundary step ≤ 4× that);
- ``hausdorff_dt`` and ``log_hausdorff_dt`` at 1×4×96³: every implementation computes the maps
  of the thresholded prediction and of the target each step; the peer is MONAI's
  HausdorffDTLoss / LogHausdorffDTLoss(softmax=True, to_onehot_y=True).

``time_forward_backward``: one training step (forward and backward, a fresh gradient);
``track_extra_peak``: its peak memory above what was in use before it, × the logits' size (the
given map is an input, not counted). Select with ``--bench DistanceLoss``.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import ClassVar

import torch

from .common import (
    Benchmark,
    exact_rss_accounting,
    extra_peak_bytes,
    loss_inputs,
    parse_shape,
    peer,
    require_fused,
    reset_peak_rss,
    step,
)

WORKLOADS = {
    "boundary_precomputed": "2x4x128x128x128",
    "boundary_on_the_fly": "2x4x128x128x128",
    "hausdorff_dt": "1x4x96x96x96",
    "log_hausdorff_dt": "1x4x96x96x96",
}
DISTANCE_IMPLEMENTATIONS = ["segloss-fused", "segloss-native", "liviaets", "monai", "dice_ce-fused"]
MONAI_CLASSES = {"hausdorff_dt": "HausdorffDTLoss", "log_hausdorff_dt": "LogHausdorffDTLoss"}


def distance_loss(workload: str, implementation: str, labels: torch.Tensor, channels: int) -> Callable:
    """``loss(logits, labels)`` for one workload and implementation; NotImplementedError (asv:
    skipped) for a combination that does not exist."""
    from segloss_core import get_loss

    if implementation == "liviaets" and workload != "boundary_precomputed":
        raise NotImplementedError("the LIVIAETS form is the boundary loss's")
    if implementation == "dice_ce-fused":
        if workload != "boundary_on_the_fly":
            raise NotImplementedError("the fused Dice+CE step is the peer of the boundary loss on the fly")
        return get_loss("dice_ce", backend="torch", impl="fused")
    if implementation == "monai":
        if workload not in MONAI_CLASSES:
            raise NotImplementedError("MONAI has no boundary loss")
        if peer("monai_losses") is None:
            raise NotImplementedError("MONAI is not installed")
        module = getattr(peer("monai_losses"), MONAI_CLASSES[workload])(softmax=True, to_onehot_y=True)
        return lambda x, y: module(x, y[:, None])
    if workload == "boundary_precomputed":
        from segloss_torch import signed_distance_map

        phi = signed_distance_map(labels, channels)  # given, as from `segloss distmap`: not timed
        if implementation == "liviaets":
            idc = list(range(1, channels))
            return lambda x, y: torch.einsum("bkxyz,bkxyz->bkxyz", torch.softmax(x, 1)[:, idc], phi[:, idc]).mean()
        module = get_loss("boundary", backend="torch", impl=implementation.removeprefix("segloss-"))
        return lambda x, y: module(x, y, distance_map=phi)
    name = "boundary" if workload == "boundary_on_the_fly" else workload
    return get_loss(name, backend="torch", impl=implementation.removeprefix("segloss-"))


class _DistanceCase(Benchmark):
    params: ClassVar[list] = [list(WORKLOADS), DISTANCE_IMPLEMENTATIONS]
    param_names: ClassVar[list] = ["workload", "implementation"]

    def prepare(self, cache, workload: str, implementation: str) -> None:
        if implementation in ("segloss-fused", "dice_ce-fused"):
            require_fused(cache)
        key = (workload, implementation)
        if getattr(self, "_key", None) != key:  # asv re-runs setup before every sample: keep the inputs
            shape = parse_shape(WORKLOADS[workload])
            self.logits, self.labels = loss_inputs(shape)
            self.loss = distance_loss(workload, implementation, self.labels, shape[1])
            self.logit_bytes = self.logits.numel() * self.logits.element_size()
            self._key = key

    def run_step(self) -> None:
        step(self.loss, self.logits, self.labels)


class DistanceLossTimeCPU(_DistanceCase):
    """Seconds per training step of the distance losses and their peers."""

    version = "1"

    def setup(self, cache, workload, implementation):
        self.prepare(cache, workload, implementation)

    def time_forward_backward(self, cache, workload, implementation):
        self.run_step()


class DistanceLossMemoryCPU(_DistanceCase):
    """The extra peak memory of one step × the logits (the given map not counted)."""

    version = "1"

    def setup(self, cache, workload, implementation):
        exact_rss_accounting()
        self.prepare(cache, workload, implementation)
        step(self.loss, self.logits, self.labels)  # lazy initialisation, code pages
        gc.collect()
        reset_peak_rss()

    def track_extra_peak(self, cache, workload, implementation):
        return round(extra_peak_bytes(self.run_step, "cpu") / self.logit_bytes, 3)

    track_extra_peak.unit = "x logits"
