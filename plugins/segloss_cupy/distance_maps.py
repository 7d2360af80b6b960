"""Distance maps on CuPy arrays from the shared EDT kernels (csrc/kernels/edt_device.cuh).

Same signatures and conventions as :mod:`segloss_core.distance_maps`: one multi-label
transform per sample for every class's inside distance, binary transforms for the outside
distances of all (sample, class) volumes in one launch per axis, then composition — batched,
no per-image or per-class launches, no padding to a cube. float32 results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from segloss_core import distance_maps as reference
from segloss_core.distance_maps import check_spacing, normalise

from . import kernels

KINDS = reference.KIND_CODES
EDT_BLOCK = kernels.LAUNCH["edt_block"]
MAX_THREADS = kernels.LAUNCH["edt_max_threads"]


def _grid(work: int, block: int) -> tuple[int]:
    return (max(1, min(-(-work // block), 65535)),)


def _transform(
    fns: dict,
    suffix: str,
    labels: Any,
    out: Any,
    volumes: int,
    label_div: int,
    multilabel: bool,
    mask_mode: bool,
    sizes: tuple[int, ...],
    spacing: tuple[float, ...],
) -> None:
    import cupy

    voxels = int(np.prod(sizes))
    last = len(sizes) - 1
    n_last = sizes[last]
    fns["first" + suffix](
        _grid(volumes * (voxels // n_last), EDT_BLOCK),
        (EDT_BLOCK,),
        (
            labels,
            out,
            np.int64(volumes),
            np.int64(voxels),
            np.int32(n_last),
            np.int64(label_div),
            np.bool_(multilabel),
            np.bool_(mask_mode),
            np.float64(spacing[last]),
        ),
    )
    n_max = max(sizes)
    v = cupy.empty(MAX_THREADS * (n_max + 2), dtype=cupy.int32)
    z = cupy.empty(MAX_THREADS * (n_max + 3), dtype=cupy.float64)
    fk = cupy.empty(MAX_THREADS * (n_max + 2), dtype=cupy.float64)
    g = cupy.empty(MAX_THREADS * (n_max + 2), dtype=cupy.float32)
    for axis in range(last - 1, -1, -1):
        stride = int(np.prod(sizes[axis + 1 :]))
        lines = volumes * (voxels // sizes[axis])
        threads = min(lines, MAX_THREADS)
        fns["parabola" + suffix](
            _grid(threads, EDT_BLOCK),
            (EDT_BLOCK,),
            (
                labels,
                out,
                np.int64(volumes),
                np.int64(voxels),
                np.int32(sizes[axis]),
                np.int64(stride),
                np.int64(label_div),
                np.bool_(multilabel),
                np.bool_(mask_mode),
                np.float64(spacing[axis]),
                v,
                z,
                fk,
                g,
            ),
        )


def _label_maps(
    labels: Any, num_classes: int, spacing: Any, kind: str, no_boundary_value: float, ignore_index: int | None
) -> Any:
    import cupy

    reference.check_labels(labels, num_classes, _xp())
    reference.check_cuda_volumes(int(labels.shape[0]), "labels")
    sizes = tuple(int(s) for s in labels.shape[1:])
    sampling = check_spacing(spacing, len(sizes))
    label_type = str(labels.dtype) if str(labels.dtype) in kernels.LABEL_TYPES else "int64"
    labels = cupy.ascontiguousarray(labels.astype(label_type, copy=False))
    batch, voxels = int(labels.shape[0]), int(np.prod(sizes))
    fns = kernels.functions(kernels.edt_names(label_type))
    counts = cupy.zeros(batch * num_classes, dtype=cupy.uint64)
    fns["count"](
        (max(1, min(-(-voxels // 256), 65535)), batch),
        (256,),
        (
            labels,
            np.int64(batch),
            np.int64(voxels),
            np.int64(num_classes),
            np.int64(ignore_index or 0),
            np.bool_(ignore_index is not None),
            counts,
        ),
        shared_mem=8 * num_classes,
    )
    din = cupy.empty(batch * voxels, dtype=cupy.float32)
    out = cupy.empty(batch * num_classes * voxels, dtype=cupy.float32)
    _transform(fns, "", labels, din, batch, 1, True, False, sizes, sampling)
    _transform(fns, "", labels, out, batch * num_classes, num_classes, False, False, sizes, sampling)
    fns["compose"](
        _grid(batch * num_classes * voxels, 256),
        (256,),
        (
            labels,
            din,
            out,
            np.int64(batch),
            np.int64(num_classes),
            np.int64(voxels),
            counts,
            np.int32(KINDS[kind]),
            np.float32(no_boundary_value),
        ),
    )
    return out.reshape(batch, num_classes, *sizes)


def unavailable() -> str | None:
    """None: the kernels are compiled by NVRTC on first use (CuPy raises if that fails)."""
    return None


def _xp() -> Any:
    import array_api_compat.cupy as xp

    return xp


def signed_distance_map(
    labels: Any,
    num_classes: int,
    spacing: float | Sequence[float] | None = None,
    *,
    convention: str = "boundary_loss",
    no_boundary_value: float = 0.0,
    normalize: str | None = None,
    ignore_index: int | None = None,
) -> Any:
    """Signed distance maps (B, C, *spatial) float32 of a CuPy label map (B, *spatial)."""
    if convention not in reference.CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(reference.CONVENTIONS)}, got {convention!r}")
    maps = _label_maps(labels, num_classes, spacing, convention, no_boundary_value, ignore_index)
    spatial = tuple(int(s) for s in labels.shape[1:])
    return normalise(_xp(), maps, normalize, check_spacing(spacing, len(spatial)), spatial)


def distance_map(
    labels: Any,
    num_classes: int,
    spacing: float | Sequence[float] | None = None,
    *,
    region: str = "boundary",
    no_boundary_value: float = 0.0,
    normalize: str | None = None,
    ignore_index: int | None = None,
) -> Any:
    """Unsigned distance maps (B, C, *spatial) float32: ``boundary``, ``inside`` or ``outside``."""
    if region not in reference.REGIONS:
        raise ValueError(f"region must be one of {', '.join(reference.REGIONS)}, got {region!r}")
    maps = _label_maps(labels, num_classes, spacing, region, no_boundary_value, ignore_index)
    spatial = tuple(int(s) for s in labels.shape[1:])
    return normalise(_xp(), maps, normalize, check_spacing(spacing, len(spatial)), spatial)


def mask_distance_map(
    masks: Any,
    spacing: float | Sequence[float] | None = None,
    *,
    kind: str = "boundary",
    no_boundary_value: float = 0.0,
) -> Any:
    """Distance maps (B, C, *spatial) float32 of binary CuPy masks; ``kind`` as in the core."""
    import cupy

    if masks.ndim < 3 or masks.ndim > 5:
        raise ValueError(f"masks must be (B, C, *spatial) with 1 to 3 spatial dims, got {tuple(masks.shape)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    sizes = tuple(int(s) for s in masks.shape[2:])
    sampling = check_spacing(spacing, len(sizes))
    reference.check_cuda_volumes(int(masks.shape[0] * masks.shape[1]), "masks")
    m = cupy.ascontiguousarray(masks.astype(cupy.uint8))
    volumes, voxels = int(masks.shape[0] * masks.shape[1]), int(np.prod(sizes))
    fns = kernels.functions(kernels.edt_names("int64"))
    counts = cupy.zeros(volumes, dtype=cupy.uint64)
    fns["count_mask"](
        (max(1, min(-(-voxels // 256), 65535)), volumes),
        (256,),
        (m, np.int64(volumes), np.int64(voxels), np.int64(1), np.int64(0), np.bool_(False), counts),
        shared_mem=8,
    )
    out = cupy.empty(volumes * voxels, dtype=cupy.float32)
    _transform(fns, "_mask", m, out, volumes, 1, True, True, sizes, sampling)
    fns["compose_mask"](
        _grid(volumes * voxels, 256),
        (256,),
        (m, out, np.int64(volumes), np.int64(voxels), counts, np.int32(KINDS[kind]), np.float32(no_boundary_value)),
    )
    return out.reshape(masks.shape)
