"""Region statistics and their backward on CuPy arrays, with the shared kernels.

Same semantics as the PyTorch fused path (csrc/kernels/region_stats.cuh): one read of the
logits (and the fields of the distance losses) for every statistic and class, deterministic
block reductions, float32 accumulation (float64 for float64 inputs); the backward reads the
inputs again and writes only the gradient.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from segloss_core.regions import membership_table
from segloss_core.statistics import ACTIVATION_CODES, FUSED_NUM_SLOTS, FUSED_SLOTS, fused_fields, fused_slot
from segloss_core.validation import PreparedInputs

from . import kernels

SLOTS = FUSED_SLOTS
NUM_SLOTS = FUSED_NUM_SLOTS
ACTIVATIONS = ACTIVATION_CODES
BLOCK = kernels.LAUNCH["block"]
GROUP = kernels.LAUNCH["group"]
CHUNK = kernels.LAUNCH["chunk"]
NULL = np.uint64(0)  # a null pointer argument


def fusable(names: Any) -> bool:
    """The kernels compute all of ``names`` (field statistics: one field of each kind)."""
    return fused_fields(names) is not None


def slot(name: str) -> int:
    return fused_slot(name)


def _dtype_name(array: Any) -> str:
    import cupy

    name = str(array.dtype)
    if name not in kernels.DTYPES:
        raise TypeError(f"the cupy backend supports float16/float32/float64 predictions, got {array.dtype}")
    del cupy
    return name


class Prepared:
    """Canonical contiguous device arrays for the kernels."""

    def __init__(self, prepared: PreparedInputs, names: Any = ()):
        import cupy

        pred = prepared.pred
        self.batch, self.channels = prepared.batch_size, prepared.num_classes
        self.voxels = int(np.prod(prepared.spatial_shape))
        self.dtype = _dtype_name(pred)
        self.acc = cupy.float64 if self.dtype == "float64" else cupy.float32
        self.logits = cupy.ascontiguousarray(pred.reshape(self.batch, self.channels, self.voxels))
        self.labels = self.target = None
        self.label_type: str | None = None
        if prepared.labels is not None:
            labels = prepared.labels.reshape(self.batch, self.voxels)
            kind = str(labels.dtype)
            if kind not in kernels.LABEL_TYPES:
                labels, kind = labels.astype(cupy.int64), "int64"
            self.labels = cupy.ascontiguousarray(labels)
            self.label_type = kind
        else:
            self.target = cupy.ascontiguousarray(
                prepared.target.reshape(self.batch, self.channels, self.voxels).astype(pred.dtype, copy=False)
            )
        self.mask = None
        self.mask_stride = 0
        if prepared.mask is not None:
            mask = prepared.mask.reshape(prepared.mask.shape[0], -1).astype(self.acc)
            self.mask = cupy.ascontiguousarray(mask)
            self.mask_stride = self.voxels if mask.shape[0] > 1 else 0
        self.regions = None  # region-based training: the int64 membership table (segloss_core.regions)
        if prepared.regions is not None:
            self.regions = cupy.asarray(np.array(membership_table(prepared.regions), dtype=np.uint64).view(np.int64))
        wanted = fused_fields(names) or {}
        self.fields = [
            None
            if kind not in wanted
            else cupy.ascontiguousarray(
                prepared.fields[wanted[kind]].reshape(self.batch, self.channels, self.voxels).astype(self.acc)
            )
            for kind in ("field_pred_sum", "field_sq_err_sum")
        ]
        self.activation = ACTIVATIONS[prepared.activation]
        self.has_ignore = prepared.ignore_index is not None
        self.ignore = 0 if prepared.ignore_index is None else int(prepared.ignore_index)

    def common_args(self, want_ce_neg: bool) -> tuple:
        return (
            NULL if self.mask is None else self.mask,
            np.int64(self.mask_stride),
            np.int64(self.batch),
            np.int64(self.channels),
            np.int64(self.voxels),
            np.int32(self.activation),
            np.int64(self.ignore),
            np.int32(self.has_ignore),
            np.int32(want_ce_neg),
            NULL if self.regions is None else self.regions,
            np.int64(0 if self.regions is None else self.regions.size),
            *(NULL if f is None else f for f in self.fields),
        )

    def data_args(self) -> tuple:
        return (
            self.logits,
            NULL if self.labels is None else self.labels,
            NULL if self.target is None else self.target,
        )


def forward(prepared: PreparedInputs, names: Any) -> tuple[Any, Prepared]:
    """Statistics (B, C, 12) in the accumulation dtype (those of ``names`` and the others the kernels
    always compute), and the canonical inputs for backward."""
    import cupy

    want_ce_neg = "ce_neg" in names
    p = Prepared(prepared, names)
    fns = kernels.functions(kernels.region_names(p.dtype, p.label_type))
    chunks = max(1, -(-p.voxels // CHUNK))
    groups = -(-p.channels // GROUP)
    partials = cupy.empty(p.batch * groups * chunks * GROUP * NUM_SLOTS, dtype=p.acc)
    # grid (chunks · groups, 1, B), the class group fastest: as csrc/cuda/region_stats.cu
    fns["partials"]((chunks * groups, 1, p.batch), (BLOCK,), (*p.data_args(), *p.common_args(want_ce_neg), partials))
    out = cupy.empty((p.batch, p.channels, NUM_SLOTS), dtype=p.acc)
    total = out.size
    fns["finish"](
        (-(-total // 256),),
        (256,),
        (partials, np.int64(p.batch), np.int64(p.channels), np.int64(groups), np.int64(chunks), out),
    )
    return out, p


def backward(p: Prepared, upstream: Any) -> Any:
    """d loss / d logits from d loss / d statistics (B, C, 12)."""
    import cupy

    fns = kernels.functions(kernels.region_names(p.dtype, p.label_type))
    grad = cupy.empty_like(p.logits)
    upstream = cupy.ascontiguousarray(upstream.astype(p.acc))
    total = p.batch * p.voxels
    blocks = max(1, min(-(-total // BLOCK), kernels.LAUNCH["max_backward_blocks"]))
    fns["backward"]((blocks,), (BLOCK,), (*p.data_args(), *p.common_args(True), upstream, grad))
    return grad
