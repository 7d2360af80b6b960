"""The ``torch.ops.segloss`` operators: schemas, fake (meta) kernels and autograd, in one place.

Defined from Python, without any compiled code, so that every path shares them: the C++ CPU
library and the nvcc-built CUDA library add only device kernels (``TORCH_LIBRARY_IMPL``), and
the NVRTC path registers Python CUDA kernels for the same ops. ``torch.compile`` traces the fake
kernels (no graph break), autograd uses the hand-written backward op, and
``torch.library.opcheck`` passes on every op.

- ``region_stats(logits, labels?, target?, mask?, activation, ignore_index, has_ignore,
  want_ce_neg, check_labels, regions?, field_pred?, field_sq_err?) -> (B, C, 12)`` statistics in
  the accumulation dtype (``csrc/kernels/region_stats.cuh`` slots), float64 for float64 logits, else
  float32; ``regions`` is the int64 membership table of region-based training
  (``segloss_core.regions``: bit c of ``regions[label]`` is channel c's target; labels outside the
  table are invalid); the fields (logits' shape, no gradient) give Σ w·p·φ and Σ w·(p − g)²·F (0
  without);
- ``region_stats_backward(grad, logits, labels?, target?, mask?, activation, ignore_index,
  has_ignore, regions?, field_pred?, field_sq_err?) -> d loss / d logits`` (logits' shape and dtype,
  contiguous);
- ``label_distance_maps(labels, num_classes, spacing, kind, no_boundary_value, ignore_index,
  has_ignore) -> (B, C, *spatial) float32`` exact distance maps (``csrc/kernels/edt.cuh``);
- ``mask_distance_maps(masks, spacing, kind, no_boundary_value) -> masks' shape, float32``;
- ``softmax_prediction_labels(logits, threshold) -> (B, *spatial) uint8``: the first class of a
  voxel's largest logit where its softmax probability 1/Σ exp(z − max) exceeds ``threshold``, else
  C (no class); 1 to 255 classes; a CPU kernel only (``csrc/torch/prediction_labels_cpu.cpp``: the
  CUDA tensors keep the masks path of :mod:`segloss_core.losses.distance`).
"""

from __future__ import annotations

import threading

import torch

from segloss_core.statistics import FUSED_NUM_SLOTS

SCHEMAS = {
    "region_stats": (
        "region_stats(Tensor logits, Tensor? labels, Tensor? target, Tensor? mask, int activation, "
        "int ignore_index, bool has_ignore, bool want_ce_neg, bool check_labels, Tensor? regions=None, "
        "Tensor? field_pred=None, Tensor? field_sq_err=None) -> Tensor"
    ),
    "region_stats_backward": (
        "region_stats_backward(Tensor grad, Tensor logits, Tensor? labels, Tensor? target, Tensor? mask, "
        "int activation, int ignore_index, bool has_ignore, Tensor? regions=None, Tensor? field_pred=None, "
        "Tensor? field_sq_err=None) -> Tensor"
    ),
    "label_distance_maps": (
        "label_distance_maps(Tensor labels, int num_classes, float[] spacing, int kind, float no_boundary_value, "
        "int ignore_index, bool has_ignore) -> Tensor"
    ),
    "mask_distance_maps": (
        "mask_distance_maps(Tensor masks, float[] spacing, int kind, float no_boundary_value) -> Tensor"
    ),
    "softmax_prediction_labels": "softmax_prediction_labels(Tensor logits, float threshold) -> Tensor",
}

_LIBRARY: torch.library.Library | None = None
_LOCK = threading.Lock()


def define() -> None:
    """Define the ops, their fake kernels and autograd (once per process; cheap, compiles nothing)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    with _LOCK:
        if _LIBRARY is not None:
            return
        library = torch.library.Library("segloss", "DEF")
        for schema in SCHEMAS.values():
            library.define(schema)
        _register_fakes()
        _register_autograd()
        _LIBRARY = library


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_fakes() -> None:
    @torch.library.register_fake("segloss::region_stats")
    def _region_stats(logits, *_inputs):  # the other inputs (schema above) do not change the shape
        return logits.new_empty(
            (logits.shape[0], logits.shape[1], FUSED_NUM_SLOTS), dtype=accumulation_dtype(logits.dtype)
        )

    @torch.library.register_fake("segloss::region_stats_backward")
    def _region_stats_backward(grad, logits, *_inputs):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake("segloss::label_distance_maps")
    def _label_distance_maps(labels, num_classes, spacing, kind, no_boundary_value, ignore_index, has_ignore):
        return labels.new_empty((labels.shape[0], num_classes, *labels.shape[1:]), dtype=torch.float32)

    @torch.library.register_fake("segloss::mask_distance_maps")
    def _mask_distance_maps(masks, spacing, kind, no_boundary_value):
        return masks.new_empty(masks.shape, dtype=torch.float32)

    @torch.library.register_fake("segloss::softmax_prediction_labels")
    def _softmax_prediction_labels(logits, threshold):
        return logits.new_empty((logits.shape[0], *logits.shape[2:]), dtype=torch.uint8)


def _register_autograd() -> None:
    def setup_context(ctx, inputs, output):
        logits, labels, target, mask, activation, ignore_index, has_ignore, _want_ce_neg, _check, *rest = inputs
        regions, field_pred, field_sq_err = (*rest, None, None, None)[:3]
        ctx.save_for_backward(logits, labels, target, mask, regions, field_pred, field_sq_err)
        ctx.scalars = (activation, ignore_index, has_ignore)
        ctx.num_inputs = len(inputs)

    def backward(ctx, grad):
        logits, labels, target, mask, regions, field_pred, field_sq_err = ctx.saved_tensors
        activation, ignore_index, has_ignore = ctx.scalars
        grad_logits = torch.ops.segloss.region_stats_backward(
            grad, logits, labels, target, mask, activation, ignore_index, has_ignore, regions, field_pred, field_sq_err
        )
        return (grad_logits, *(None,) * (ctx.num_inputs - 1))  # no gradient into labels, targets, masks, fields

    torch.library.register_autograd("segloss::region_stats", backward, setup_context=setup_context)
