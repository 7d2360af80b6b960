"""Distance maps on torch tensors, on the tensor's device, from the exact EDT kernels.

Same signatures and conventions as :mod:`segloss_core.distance_maps` (read its docstring).
One op call computes every (sample, class) map: a multi-label transform per sample gives the
inside distances of all classes at once, a binary transform per present class the outside ones
(CPU: parallel over lines; CUDA: one launch per axis for all volumes). Without the compiled
extension the float64 reference runs on the CPU instead (the build warns once).

>>> import torch
>>> labels = torch.tensor([[0, 0, 1, 1, 1, 0]])
>>> signed_distance_map(labels, 2)[0, 1]
tensor([ 2.,  1., -0., -1., -0.,  1.])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from segloss_core import distance_maps as reference
from segloss_core.distance_maps import check_spacing, normalise

from . import fused

__all__ = ["distance_map", "mask_distance_map", "signed_distance_map", "softmax_prediction_labels", "unavailable"]

KINDS = reference.KIND_CODES


def unavailable() -> str | None:
    """None where the compiled EDT ops run, else why not (the float64 reference then runs on the CPU)."""
    return None if fused.is_built() else fused.status_line()


def _xp():
    import array_api_compat.torch as xp

    return xp


def _label_maps(
    labels: torch.Tensor,
    num_classes: int,
    spacing: float | Sequence[float] | None,
    kind: str,
    no_boundary_value: float,
    normalize: str | None,
    ignore_index: int | None,
) -> torch.Tensor:
    reference.check_labels(labels, num_classes, _xp())
    spatial = tuple(labels.shape[1:])
    sampling = check_spacing(spacing, len(spatial))
    if labels.is_cuda:
        reference.check_cuda_volumes(int(labels.shape[0]), "labels")
    if fused.available_on(labels.device.type):
        maps = torch.ops.segloss.label_distance_maps(
            labels,
            num_classes,
            list(sampling),
            KINDS[kind],
            float(no_boundary_value),
            0 if ignore_index is None else int(ignore_index),
            ignore_index is not None,
        )
    else:
        array = labels.cpu().numpy()
        if kind in reference.CONVENTIONS:
            out = reference.signed_distance_map(
                array,
                num_classes,
                sampling,
                convention=kind,
                no_boundary_value=no_boundary_value,
                ignore_index=ignore_index,
            )
        else:
            out = reference.distance_map(
                array,
                num_classes,
                sampling,
                region=kind,
                no_boundary_value=no_boundary_value,
                ignore_index=ignore_index,
            )
        maps = torch.from_numpy(out).to(device=labels.device, dtype=torch.float32)
    return normalise(_xp(), maps, normalize, sampling, spatial)


def signed_distance_map(
    labels: torch.Tensor,
    num_classes: int,
    spacing: float | Sequence[float] | None = None,
    *,
    convention: str = "boundary_loss",
    no_boundary_value: float = 0.0,
    normalize: str | None = None,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Signed distance maps (B, C, *spatial) float32 of a label map (B, *spatial), on its device."""
    if convention not in reference.CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(reference.CONVENTIONS)}, got {convention!r}")
    return _label_maps(labels, num_classes, spacing, convention, no_boundary_value, normalize, ignore_index)


def distance_map(
    labels: torch.Tensor,
    num_classes: int,
    spacing: float | Sequence[float] | None = None,
    *,
    region: str = "boundary",
    no_boundary_value: float = 0.0,
    normalize: str | None = None,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Unsigned distance maps (B, C, *spatial) float32: ``boundary``, ``inside`` or ``outside``."""
    if region not in reference.REGIONS:
        raise ValueError(f"region must be one of {', '.join(reference.REGIONS)}, got {region!r}")
    return _label_maps(labels, num_classes, spacing, region, no_boundary_value, normalize, ignore_index)


def mask_distance_map(
    masks: torch.Tensor,
    spacing: float | Sequence[float] | None = None,
    *,
    kind: str = "boundary",
    no_boundary_value: float = 0.0,
) -> torch.Tensor:
    """Distance maps (B, C, *spatial) float32 of binary masks (B, C, *spatial), e.g. a thresholded
    prediction (``kind="boundary"`` is MONAI HausdorffDTLoss's field) or multi-label targets;
    ``kind`` is a signed convention or an unsigned region. One transform per mask."""
    if masks.dim() < 3 or masks.dim() > 5:
        raise ValueError(f"masks must be (B, C, *spatial) with 1 to 3 spatial dims, got {tuple(masks.shape)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    sampling = check_spacing(spacing, masks.dim() - 2)
    if masks.is_cuda:
        reference.check_cuda_volumes(int(masks.shape[0] * masks.shape[1]), "masks")
    if fused.available_on(masks.device.type):
        return torch.ops.segloss.mask_distance_maps(masks, list(sampling), KINDS[kind], float(no_boundary_value))
    field = reference.mask_distance_map(masks.cpu().numpy(), sampling, kind=kind, no_boundary_value=no_boundary_value)
    return torch.from_numpy(field).to(device=masks.device, dtype=torch.float32)


def softmax_prediction_labels(logits: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """The softmax of ``logits`` (B, C, *spatial) thresholded as one label map (B, *spatial) uint8:
    the class of a voxel's largest logit where its probability 1/Σ exp(z − max) exceeds
    ``threshold``, else C (no class), from one read of the logits (``segloss::softmax_prediction_labels``,
    no softmax copy). None where that kernel does not run (CUDA tensors, no compiled library, more
    than 255 classes): the caller then thresholds the probabilities itself."""
    if logits.device.type != "cpu" or not 1 <= int(logits.shape[1]) <= 255 or not fused.available_on("cpu"):
        return None
    return torch.ops.segloss.softmax_prediction_labels(logits, float(threshold))
