"""Region-based training (nnU-Net's BraTS/KiTS mode): overlapping regions of labels, one sigmoid channel each.

A region is a set of labels; channel r of the prediction is trained to say "this voxel's label is
in region r". BraTS (labels 1 edema, 2 non-enhancing core, 3 enhancing tumour) trains the whole
tumour, the tumour core and the enhancing tumour::

    regions = ((1, 2, 3), (2, 3), (3,))

Every statistics loss and the distance losses take ``regions=`` with integer label maps
(B, *spatial) and ``activation="sigmoid"``: the target of channel r is ``g_r = [label ∈ regions[r]]``,
computed per voxel from the label, never stored as a (B, R, *spatial) tensor in the fused kernels.
The kernels read a small **membership table**: ``table[l]`` is the bitmask of the regions that
contain label l (bit r for region r), for l in [0, L] with L the largest label the regions name;
a voxel's label gives every channel's g in one read. Labels in the map must lie in [0, L] or be
``ignore_index`` (checked before any kernel runs; in a kernel a label outside the table is counted
as invalid and weighs 0, so it is never used as an index).

``ignore_index`` works as in nnU-Net (``DC_and_BCE_loss(use_ignore_label=True)``: the ignore label
is the last target channel there, turned into the mask): an ignored voxel has weight 0 in every
channel; the ignore label may not be part of a region.

:func:`regions_to_labels` turns sigmoid outputs back into a label map with nnU-Net's
``regions_class_order`` (``LabelManager.convert_probabilities_to_segmentation``).

>>> membership_table(((1, 2, 3), (2, 3), (3,)))
(0, 1, 3, 7)
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

Array = Any
Regions = tuple[tuple[int, ...], ...]

__all__ = [
    "MAX_REGIONS",
    "MAX_REGION_LABEL",
    "check_regions",
    "largest_label",
    "membership_table",
    "region_masks",
    "region_targets",
    "regions_to_labels",
]

MAX_REGIONS = 64
"""At most 64 regions: a label's membership is one 64-bit mask in the kernels."""
MAX_REGION_LABEL = 65535
"""Labels named in regions lie in [0, 65535] (nnU-Net's uint16 segmentations); the table has one
entry per label up to the largest one named."""


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_regions(value: Any, owner: str, name: str = "regions") -> Regions:
    """``value`` as a tuple of regions, each a tuple of distinct labels; ``ValueError``/``TypeError``
    naming ``regions`` for anything else.

    A region is a non-empty sequence of integer labels in [0, 65535] (a bare int is the region of
    that one label, as nnU-Net's ``dataset.json`` allows); no label twice in a region, no region
    twice, at least one and at most 64 regions.
    """
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"{owner}: parameter {name!r} must be a sequence of regions (each a sequence of labels), e.g. "
            f"((1, 2, 3), (2, 3), (3,)); got {type(value).__name__}"
        )
    if len(value) == 0:
        raise ValueError(f"{owner}: parameter {name!r} must name at least one region, got {value!r}")
    if len(value) > MAX_REGIONS:
        raise ValueError(f"{owner}: parameter {name!r} has {len(value)} regions; at most {MAX_REGIONS} are supported")
    out: list[tuple[int, ...]] = []
    for index, region in enumerate(value):
        if hasattr(region, "tolist") and not isinstance(region, (list, tuple)):
            region = region.tolist()
        labels = (region,) if _is_int(region) else region
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
            raise TypeError(
                f"{owner}: parameter {name!r}: region {index} must be a sequence of integer labels (or one int), "
                f"got {type(region).__name__} {region!r}"
            )
        if len(labels) == 0:
            raise ValueError(f"{owner}: parameter {name!r}: region {index} is empty; every region needs a label")
        for label in labels:
            if not _is_int(label):
                raise TypeError(
                    f"{owner}: parameter {name!r}: region {index} holds {label!r} ({type(label).__name__}); labels "
                    "are integers"
                )
            if not 0 <= int(label) <= MAX_REGION_LABEL:
                raise ValueError(
                    f"{owner}: parameter {name!r}: region {index} holds label {int(label)}, outside the label range "
                    f"[0, {MAX_REGION_LABEL}]"
                )
        converted = tuple(int(label) for label in labels)
        if len(set(converted)) != len(converted):
            raise ValueError(f"{owner}: parameter {name!r}: region {index} {converted} names a label twice")
        for other, earlier in enumerate(out):
            if set(earlier) == set(converted):
                raise ValueError(
                    f"{owner}: parameter {name!r}: regions {other} and {index} are the same label set {converted}"
                )
        out.append(converted)
    return tuple(out)


def largest_label(regions: Regions) -> int:
    """L, the largest label the regions name: valid labels of a map are [0, L] (and ``ignore_index``)."""
    return max(max(region) for region in regions)


def membership_table(regions: Regions) -> tuple[int, ...]:
    """``table[l]`` = Σ_r 2^r over the regions r that contain label l, for l in [0, L]."""
    table = [0] * (largest_label(regions) + 1)
    for bit, region in enumerate(regions):
        for label in region:
            table[label] |= 1 << bit
    return tuple(table)


def region_masks(xp: Any, labels: Array, regions: Regions) -> Array:
    """Bool (B, R, *S) from labels (B, *S): channel r is ``label ∈ regions[r]`` (a label in no region,
    ``ignore_index`` included, is in none)."""
    channels = [None] * len(regions)
    for r, region in enumerate(regions):
        member = labels == region[0]
        for label in region[1:]:
            member = xp.logical_or(member, labels == label)
        channels[r] = member
    return xp.stack(channels, axis=1)


def region_targets(xp: Any, labels: Array, regions: Regions, dtype: Any) -> Array:
    """g (B, R, *S) in ``dtype`` from labels (B, *S): 1 where the label is in region r, else 0 (the
    Python paths; the fused kernels read :func:`membership_table` per voxel instead)."""
    return xp.astype(region_masks(xp, labels, regions), dtype)


def check_plan_regions(plan: Any) -> Regions | None:
    """The regions every term of ``plan`` shares (None without), checked against the terms'
    parameters: every term takes the same ``regions``, with ``activation`` sigmoid or none, and the
    ignore label is no region's label."""
    found: list[tuple[str, Regions | None]] = []
    for term in plan.terms:
        params = term.params
        if "regions" not in params:
            found.append((term.spec.name, None))
            continue
        regions = params["regions"]
        found.append((term.spec.name, regions))
        if regions is None:
            continue
        if params.get("activation", "sigmoid") == "softmax":
            raise ValueError(
                f"loss {plan.name!r}: regions= trains overlapping regions with independent channels: it needs "
                "activation='sigmoid' (or 'none' for probabilities), not 'softmax'"
            )
        ignore = params.get("ignore_index")
        if ignore is not None and any(ignore in region for region in regions):
            raise ValueError(
                f"loss {plan.name!r}: regions {regions} contain the ignore label ignore_index={ignore}; the ignore "
                "label belongs to no region (nnU-Net requires the same)"
            )
    given = {regions for _, regions in found if regions is not None}
    if not given:
        return None
    if len(given) > 1 or any(regions is None for _, regions in found):
        described = ", ".join(f"{name}: {regions}" for name, regions in found)
        raise ValueError(
            f"loss {plan.name!r}: every term must take the same regions= (a term without the parameter cannot "
            f"train regions); got {described}"
        )
    return next(iter(given))


def regions_to_labels(
    probabilities: Array,
    regions_class_order: Sequence[int],
    *,
    threshold: float = 0.5,
    channel_axis: int = 1,
) -> Array:
    """A label map from region probabilities, as nnU-Net's ``convert_probabilities_to_segmentation``.

    Start from 0 everywhere; for each channel i in order, voxels with ``probabilities[i] > threshold``
    get label ``regions_class_order[i]``, so a later (nested, smaller) region overwrites an earlier
    one. BraTS: regions ((1, 2, 3), (2, 3), (3,)) with ``regions_class_order=(1, 2, 3)`` gives back
    labels 1, 2, 3. ``channel_axis`` is the axis of the R channels (1 for segloss's (B, R, *S); 0 for
    nnU-Net's per-case (R, *S)). Pass sigmoid probabilities (``logits > 0`` is ``p > 0.5``). Returns
    int64 labels with the channel axis removed, in the input's library and device.

    >>> import numpy as np
    >>> p = np.array([[[0.9, 0.9, 0.2]], [[0.1, 0.8, 0.1]], [[0.0, 0.7, 0.0]]])  # (R=3, 1, 3)
    >>> regions_to_labels(p, (1, 2, 3), channel_axis=0).tolist()
    [[1, 3, 0]]
    """
    from .arrays import device, get_namespace

    xp = get_namespace(probabilities)
    ndim = len(probabilities.shape)
    axis = channel_axis + ndim if channel_axis < 0 else channel_axis
    if not 0 <= axis < ndim:
        raise ValueError(
            f"channel_axis={channel_axis} is out of range for probabilities of shape {tuple(probabilities.shape)}"
        )
    order = [int(c) for c in regions_class_order]
    channels = int(probabilities.shape[axis])
    if len(order) != channels:
        raise ValueError(
            f"regions_class_order has {len(order)} entries but probabilities have {channels} channels on axis {axis}"
        )
    shape = tuple(int(s) for i, s in enumerate(probabilities.shape) if i != axis)
    labels = xp.zeros(shape, dtype=xp.int64, device=device(probabilities))
    for index, label in enumerate(order):
        channel = xp.take(probabilities, xp.asarray([index], device=device(probabilities)), axis=axis)
        above = xp.reshape(channel, shape) > threshold
        labels = xp.where(above, xp.full_like(labels, label), labels)
    return labels
