"""Distance maps of label maps: signed (boundary losses) and unsigned (Hausdorff-DT losses).

For class c of sample b, with S_c = {voxels labelled c} and spacing (physical size of a voxel
along each axis):

* ``d_out(x)`` = distance from x ∉ S_c to the nearest voxel of S_c (0 on S_c);
* ``d_in(x)``  = distance from x ∈ S_c to the nearest voxel not in S_c (0 off S_c).

Distances are exact Euclidean distances between voxel centres in physical units (scipy's
``distance_transform_edt`` with ``sampling=spacing``). The ``convention`` builds the map:

=========================  ===================================  ====================================
convention                 inside S_c                           outside S_c
=========================  ===================================  ====================================
``boundary_loss``          −(d_in − 1)  (inner boundary: 0)     +d_out       LIVIAETS ``one_hot2dist``
``signed``                 −d_in                                +d_out
``signed_inside_positive`` +d_in                                −d_out       seung-lab ``edt.sdf``
=========================  ===================================  ====================================

Unsigned maps (:func:`distance_map`): ``boundary`` = d_in + d_out (MONAI's HausdorffDTLoss
field: distance to the other side, everywhere), ``inside`` = d_in, ``outside`` = d_out.

A class with no boundary — absent from the sample, or filling it — gets ``no_boundary_value``
(default 0) everywhere, not scipy's artefact for a mask without background (distances to a
phantom voxel at index −1, scipy#15585, boundary-loss#18). Voxels labelled ``ignore_index``
belong to no class. Optional ``normalize``: ``"max"`` divides each (b, c) map by its largest
absolute value, ``"extent"`` by the image diagonal in physical units.

Note on ``boundary_loss`` with anisotropic spacing: LIVIAETS subtracts 1 (one voxel, not one
unit of spacing) inside, and so does this convention, to reproduce it exactly; ``signed`` has
no such offset. A drawn example is in docs/distance_maps.md.

>>> import numpy as np
>>> labels = np.array([[0, 0, 1, 1, 1, 0]])
>>> signed_distance_map(labels, 2)[0, 1]
array([ 2.,  1., -0., -1., -0.,  1.])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from .arrays import from_numpy, get_namespace, is_cupy, is_numpy, library_name, to_numpy

Array = Any
CONVENTIONS = ("boundary_loss", "signed", "signed_inside_positive")
REGIONS = ("boundary", "inside", "outside")
# codes of the kernels' DistanceKind (csrc/kernels/edt.cuh): conventions, then regions
KIND_CODES: dict[str, int] = {name: code for code, name in enumerate(CONVENTIONS + REGIONS)}


class DistanceMapKernels(Protocol):
    """What a backend's :meth:`~segloss_core.Backend.distance_maps_for` returns (a module is fine):
    the three functions below with their signatures minus ``reference``, for the arrays it claims."""

    def signed_distance_map(
        self, labels: Array, num_classes: int, spacing: Any = None, **options: Any
    ) -> Array: ...  # pragma: no cover - a protocol

    def distance_map(
        self, labels: Array, num_classes: int, spacing: Any = None, **options: Any
    ) -> Array: ...  # pragma: no cover - a protocol

    def mask_distance_map(self, masks: Array, spacing: Any = None, **options: Any) -> Array: ...  # pragma: no cover

    def unavailable(self) -> str | None:
        """None where the compiled kernels run, else why not (the maps then come from a fallback)."""
        ...  # pragma: no cover - a protocol

    # optional: ``softmax_prediction_labels(logits, threshold) -> labels or None``
    # (:func:`softmax_prediction_labels`; a backend without it leaves the masks to the losses)


def check_spacing(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """Per-axis spacing as a tuple of ``ndim`` positive floats (``None`` = 1 everywhere)."""
    if spacing is None:
        return (1.0,) * ndim
    if isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
        values = (float(spacing),) * ndim
    else:
        try:
            values = tuple(float(s) for s in spacing)  # type: ignore[union-attr]
        except TypeError:
            raise TypeError(f"spacing must be a number or a sequence of {ndim} numbers, got {spacing!r}") from None
    if len(values) != ndim:
        raise ValueError(f"spacing has {len(values)} values but the label map has {ndim} spatial dims")
    if not all(v > 0 and math.isfinite(v) for v in values):
        raise ValueError(f"spacing must be positive and finite, got {values}")
    return values


def check_labels(labels: Array, num_classes: int, xp: Any) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not (xp.isdtype(labels.dtype, "integral") or xp.isdtype(labels.dtype, "bool")):
        raise TypeError(f"labels must be an integer label map (B, *spatial), got dtype {labels.dtype}")
    if labels.ndim < 2 or labels.ndim > 4:
        raise ValueError(f"labels must have shape (B, *spatial) with 1 to 3 spatial dims, got {tuple(labels.shape)}")
    if any(int(s) == 0 for s in labels.shape):
        raise ValueError(f"labels is empty (shape {tuple(labels.shape)})")


def compose_signed(
    xp: Any,
    d_in: Array,
    d_out: Array,
    inside: Array,
    has_boundary: Array,
    convention: str = "boundary_loss",
    no_boundary_value: float = 0.0,
) -> Array:
    """φ from the two distances (any array-API namespace; shared by every backend).

    ``inside`` is the class mask (B, C, *S) as bool; ``has_boundary`` (B, C, 1, …) bool.
    """
    if convention == "boundary_loss":
        phi = xp.where(inside, -(d_in - 1.0), d_out)
    elif convention == "signed":
        phi = xp.where(inside, -d_in, d_out)
    elif convention == "signed_inside_positive":
        phi = xp.where(inside, d_in, -d_out)
    else:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    return xp.where(has_boundary, phi, xp.full_like(phi, no_boundary_value))


def compose_unsigned(
    xp: Any, d_in: Array, d_out: Array, has_boundary: Array, region: str = "boundary", no_boundary_value: float = 0.0
) -> Array:
    if region == "boundary":
        field = d_in + d_out
    elif region == "inside":
        field = d_in
    elif region == "outside":
        field = d_out
    else:
        raise ValueError(f"region must be one of {', '.join(REGIONS)}, got {region!r}")
    return xp.where(has_boundary, field, xp.full_like(field, no_boundary_value))


def normalise(
    xp: Any, phi: Array, normalize: str | None, spacing: tuple[float, ...], spatial: tuple[int, ...]
) -> Array:
    if normalize is None:
        return phi
    if normalize == "max":
        axes = tuple(range(2, phi.ndim))
        scale = xp.max(xp.abs(phi), axis=axes, keepdims=True)
        return phi / xp.where(scale > 0, scale, xp.ones_like(scale))
    if normalize == "extent":
        diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(spatial, spacing, strict=True)))
        return phi / diagonal
    raise ValueError(f"normalize must be None, 'max' or 'extent', got {normalize!r}")


# ---------------------------------------------------------------------------------------
# reference implementation: scipy (NumPy, and any other library through a host copy) and
# cupyx (CuPy), one class at a time
# ---------------------------------------------------------------------------------------
def _edt_module(labels: Array) -> tuple[Any, Any]:
    """(namespace, exact EDT) of the reference for ``labels``: cupyx for CuPy, else scipy on NumPy."""
    if is_cupy(get_namespace(labels)):
        import cupy
        from cupyx.scipy.ndimage import distance_transform_edt

        return cupy, distance_transform_edt
    from scipy.ndimage import distance_transform_edt

    return np, distance_transform_edt


def _on_host(x: Array) -> bool:
    """Whether ``x`` goes through a NumPy copy for the reference (neither NumPy nor CuPy)."""
    xp = get_namespace(x)
    return not (is_numpy(xp) or is_cupy(xp))


def class_distances(
    labels: Array,
    num_classes: int,
    spacing: float | Sequence[float] | None = None,
    ignore_index: int | None = None,
) -> tuple[Array, Array, Array, Array]:
    """(d_in, d_out, inside, has_boundary) for every (sample, class): the raw material of the maps.

    NumPy arrays use scipy's exact EDT, CuPy arrays cupyx's; float64 (NumPy) or float32 (CuPy).
    """
    xp, edt = _edt_module(labels)
    check_labels(labels, num_classes, xp)
    batch, spatial = int(labels.shape[0]), tuple(int(s) for s in labels.shape[1:])
    sampling = check_spacing(spacing, len(spatial))
    dtype = xp.float64 if xp is np else xp.float32
    d_in = xp.zeros((batch, num_classes, *spatial), dtype=dtype)
    d_out = xp.zeros_like(d_in)
    inside = xp.zeros(d_in.shape, dtype=bool)
    has_boundary = xp.zeros((batch, num_classes) + (1,) * len(spatial), dtype=bool)
    for b in range(batch):
        for c in range(num_classes):
            mask = labels[b] == c
            if ignore_index is not None and ignore_index == c:
                mask = xp.zeros_like(mask)
            inside[b, c] = mask
            count = int(mask.sum())
            if count == 0 or count == mask.size:
                continue  # no boundary: scipy's no-background artefact never reaches the result
            has_boundary[b, c] = True
            d_in[b, c] = edt(mask, sampling=sampling)
            d_out[b, c] = edt(~mask, sampling=sampling)
    return d_in, d_out, inside, has_boundary


CUDA_MAX_VOLUMES = 65535  # the CUDA kernels put one map (label map, or mask) per grid row


def check_cuda_volumes(count: int, what: str) -> None:
    """Refuse, before any launch, more maps in one call than the CUDA grid holds."""
    if count > CUDA_MAX_VOLUMES:
        raise ValueError(
            f"{what}: {count} maps in one call on the GPU, at most {CUDA_MAX_VOLUMES} (the CUDA grid's y "
            "dimension); split the batch"
        )


def _kernels(labels: Array, reference: bool) -> DistanceMapKernels | None:
    """The distance-map kernels a registered backend offers for ``labels`` (see
    :meth:`segloss_core.Backend.distance_maps_for`), or None for the reference here."""
    if not isinstance(reference, bool):
        raise TypeError(f"reference must be True or False, got {reference!r}")
    xp = get_namespace(labels)
    if reference:
        if not (is_numpy(xp) or is_cupy(xp)):
            raise TypeError(
                f"reference=True takes NumPy or CuPy labels (scipy or cupyx EDT), got a {library_name(labels)} "
                "array; convert it to NumPy (for a torch tensor: labels.cpu().numpy()), or omit reference to "
                "use the kernels of its backend"
            )
        return None
    from .registry import registry  # the registry loads the loss catalog, which imports this module

    return registry().distance_map_kernels(labels)


def _reference_fallback(function: Callable[..., Array], labels: Array, *args: Any, **kwargs: Any) -> Array:
    """``function`` (a reference below) on ``labels``; arrays that are neither NumPy nor CuPy and have
    no backend kernels (e.g. JAX) go through a NumPy copy and come back on their library and device."""
    if not _on_host(labels):
        return function(labels, *args, **kwargs)
    return from_numpy(function(to_numpy(labels), *args, **kwargs), like=labels)


def signed_distance_map(
    labels: Array,
    num_classes: int,
    spacing: float | Sequence[float] | None = None,
    *,
    convention: str = "boundary_loss",
    no_boundary_value: float = 0.0,
    normalize: str | None = None,
    ignore_index: int | None = None,
    reference: bool = False,
) -> Array:
    """Signed distance map (B, C, *spatial) of a label map (B, *spatial); see the module docstring.

    Dispatches through the registry: a backend whose :meth:`~segloss_core.Backend.distance_maps_for`
    claims the array computes the maps (torch tensors: the segloss torch ops on the tensor's
    device; CuPy arrays: the shared segloss kernels; float32). Otherwise the reference runs:
    scipy for NumPy (float64), ``cupyx.scipy.ndimage.distance_transform_edt`` for CuPy, and scipy
    on a host copy for any other library (e.g. JAX), returned on the array's library and device.
    ``reference=True`` asks for the reference on NumPy or CuPy labels even where kernels exist.
    """
    kernels = _kernels(labels, reference)
    if kernels is not None:
        return kernels.signed_distance_map(
            labels,
            num_classes,
            spacing,
            convention=convention,
            no_boundary_value=no_boundary_value,
            normalize=normalize,
            ignore_index=ignore_index,
        )
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    return _reference_fallback(
        _reference_labels, labels, num_classes, spacing, convention, no_boundary_value, normalize, ignore_index
    )


def _reference_labels(
    labels: Array,
    num_classes: int,
    spacing: float | Sequence[float] | None,
    kind: str,
    no_boundary_value: float,
    normalize: str | None,
    ignore_index: int | None,
) -> Array:
    """The reference map of a label map: ``kind`` is a signed convention or an unsigned region."""
    d_in, d_out, inside, has_boundary = class_distances(labels, num_classes, spacing, ignore_index)
    xp = _edt_module(labels)[0]
    if kind in CONVENTIONS:
        field = compose_signed(xp, d_in, d_out, inside, has_boundary, kind, no_boundary_value)
    else:
        field = compose_unsigned(xp, d_in, d_out, has_boundary, kind, no_boundary_value)
    spatial = tuple(int(s) for s in labels.shape[1:])
    return normalise(xp, field, normalize, check_spacing(spacing, len(spatial)), spatial)


def distance_map(
    labels: Array,
    num_classes: int,
    spacing: float | Sequence[float] | None = None,
    *,
    region: str = "boundary",
    no_boundary_value: float = 0.0,
    normalize: str | None = None,
    ignore_index: int | None = None,
    reference: bool = False,
) -> Array:
    """Unsigned distance map (B, C, *spatial): ``boundary`` (d_in + d_out), ``inside`` or ``outside``
    (dispatch and ``reference`` as :func:`signed_distance_map`)."""
    kernels = _kernels(labels, reference)
    if kernels is not None:
        return kernels.distance_map(
            labels,
            num_classes,
            spacing,
            region=region,
            no_boundary_value=no_boundary_value,
            normalize=normalize,
            ignore_index=ignore_index,
        )
    if region not in REGIONS:
        raise ValueError(f"region must be one of {', '.join(REGIONS)}, got {region!r}")
    return _reference_fallback(
        _reference_labels, labels, num_classes, spacing, region, no_boundary_value, normalize, ignore_index
    )


def softmax_prediction_labels(logits: Array, threshold: float) -> Array | None:
    """The softmax prediction of ``logits`` (B, C, *spatial) thresholded as one label map
    (B, *spatial): the class of a voxel's largest logit where its probability exceeds ``threshold``
    (1/Σ exp(z − max): the largest logit's exp(0) over the sum), C (no class) elsewhere. For a
    threshold ≥ 0.5 the map of class c of it is that of the mask ``softmax(z)_c > threshold`` (no
    other class can exceed 1/2). From the backend's kernels where they offer it (an optional
    function of :class:`DistanceMapKernels`: the torch CPU op), else None (the caller builds the
    masks: no reference here)."""
    kernels = _kernels(logits, False)
    function = getattr(kernels, "softmax_prediction_labels", None)
    return None if function is None else function(logits, threshold)


def mask_distance_map(
    masks: Array,
    spacing: float | Sequence[float] | None = None,
    *,
    kind: str = "boundary",
    no_boundary_value: float = 0.0,
) -> Array:
    """Distance map (B, C, *spatial) of binary masks (B, C, *spatial) — a thresholded prediction, or
    multi-label (sigmoid) targets. ``kind`` is a signed convention or an unsigned region."""
    kernels = _kernels(masks, False)
    if kernels is not None:
        return kernels.mask_distance_map(masks, spacing, kind=kind, no_boundary_value=no_boundary_value)
    if kind not in CONVENTIONS + REGIONS:
        raise ValueError(f"kind must be one of {', '.join(CONVENTIONS + REGIONS)}, got {kind!r}")
    return _reference_fallback(_reference_masks, masks, spacing, kind, no_boundary_value)


def _reference_masks(
    masks: Array, spacing: float | Sequence[float] | None, kind: str, no_boundary_value: float
) -> Array:
    xp = _edt_module(masks)[0]
    d_in, d_out, has_boundary = mask_distances(masks, spacing)
    if kind in CONVENTIONS:
        return compose_signed(xp, d_in, d_out, masks.astype(bool), has_boundary, kind, no_boundary_value)
    return compose_unsigned(xp, d_in, d_out, has_boundary, kind, no_boundary_value)


def mask_distances(masks: Array, spacing: float | Sequence[float] | None = None) -> tuple[Array, Array, Array]:
    """(d_in, d_out, has_boundary) of binary masks (B, C, *spatial) (e.g. thresholded predictions)."""
    xp, edt = _edt_module(masks)
    masks = masks.astype(bool)
    batch, channels = int(masks.shape[0]), int(masks.shape[1])
    spatial = tuple(int(s) for s in masks.shape[2:])
    sampling = check_spacing(spacing, len(spatial))
    dtype = xp.float64 if xp is np else xp.float32
    d_in = xp.zeros(masks.shape, dtype=dtype)
    d_out = xp.zeros_like(d_in)
    has_boundary = xp.zeros((batch, channels) + (1,) * len(spatial), dtype=bool)
    for b in range(batch):
        for c in range(channels):
            mask = masks[b, c]
            count = int(mask.sum())
            if count == 0 or count == mask.size:
                continue
            has_boundary[b, c] = True
            d_in[b, c] = edt(mask, sampling=sampling)
            d_out[b, c] = edt(~mask, sampling=sampling)
    return d_in, d_out, has_boundary
