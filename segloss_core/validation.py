"""The input contract, shared by every backend: checked before any computation.

``pred``
    (B, C, *spatial) floating point, 1–3 spatial dims (0–3 for the voxelwise losses whose spec
    sets ``min_spatial_dims=0``: cross-entropy, BCE, focal, top-k CE): logits for ``activation="softmax"``
    (mutually exclusive classes) or ``"sigmoid"`` (independent channels; C = 1 is binary
    foreground), probabilities for ``"none"``.
``target``
    integer labels (B, *spatial) or (B, 1, *spatial) with values in [0, C) (0/1 for a
    single sigmoid channel) or ``ignore_index``; or floating one-hot/soft targets with the
    shape of ``pred``.
``mask``
    optional voxel weights, (B, *spatial), (B, 1, *spatial) or per class (B, C, *spatial)
    (a leading 1 broadcasts over the batch); bool or floating. Applied after the
    activation: a voxel of weight 0 contributes nothing to any statistic or gradient.

Out-of-range labels raise here, with the offending value, so they can never reach a kernel
that indexes with them. Logits are *not* checked for finiteness (that would cost a pass
over the largest tensor). A logit without a probability (NaN, or +inf under softmax) gives a
NaN loss and gradient. An infinity that only saturates the activation (−inf under softmax,
±inf under sigmoid) acts as its limit, p = 0 or 1 exactly: region losses stay finite (as at
logit ±1e30) and a log term on a zero probability is +inf (tests/core/test_validation.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .arrays import device, get_namespace, is_torch, library_name
from .regions import largest_label
from .spec import LossPlan

Array = Any


@dataclass(frozen=True)
class PreparedInputs:
    """Validated inputs in canonical layout (no copies of ``pred``)."""

    pred: Array  # (B, C, *S) floating
    labels: Array | None  # (B, *S) integer, or None for probability targets
    target: Array | None  # (B, C, *S) floating, or None for labels
    mask: Array | None  # (B|1, 1|C, *S), or None
    num_classes: int
    ignore_index: int | None
    activation: str
    fields: dict[str, Array] | None = None  # per-voxel constant fields (B, C, *S), see statistics.FIELD
    regions: tuple[tuple[int, ...], ...] | None = None  # region-based training: g_r = [label ∈ regions[r]]

    @property
    def batch_size(self) -> int:
        return int(self.pred.shape[0])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.pred.shape[2:])


def _shape(x: Array) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def _dtype_name(x: Array) -> str:
    return str(x.dtype).replace("torch.", "")


def _namespace(name: str, x: Array) -> Any:
    try:
        return get_namespace(x)
    except TypeError:
        raise TypeError(
            f"{name} must be an array or tensor (numpy, cupy, torch, ...), got {type(x).__name__}"
        ) from None


def _same_library_and_device(name: str, x: Array, pred: Array) -> None:
    got, want = library_name(x), library_name(pred)
    if got != want:
        raise TypeError(
            f"{name} is a {got} array but pred is a {want} array; pass {name} from the same library as pred "
            f"(and on its device)"
        )
    try:
        device(x, pred)
    except ValueError:
        raise ValueError(f"{name} is on device {device(x)} but pred is on {device(pred)}") from None


def label_bounds(labels: Array, xp: Any) -> tuple[int, int]:
    """(min, max) of a non-empty label array: one pass and one device-to-host copy for torch
    (``aminmax``; min and max apart read the labels twice and synchronise twice)."""
    if is_torch(xp):
        import torch  # labels are a torch tensor: torch is imported already

        lo, hi = torch.stack(torch.aminmax(labels)).tolist()
        return int(lo), int(hi)
    return int(xp.min(labels)), int(xp.max(labels))


def label_range_error(labels: Array, xp: Any, valid_max: int, ignore_index: int | None) -> str | None:
    """Describe the first label outside [0, valid_max) that is not ``ignore_index``, or None."""
    lo, hi = label_bounds(labels, xp)
    if lo >= 0 and hi < valid_max:
        return None
    bad = xp.logical_or(labels < 0, labels >= valid_max)
    if ignore_index is not None:
        bad = xp.logical_and(bad, labels != ignore_index)
    if not bool(xp.any(bad)):
        return None
    offending = xp.reshape(labels, (-1,))[xp.reshape(bad, (-1,))]
    values = sorted({int(offending[i]) for i in range(min(64, int(offending.shape[0])))})
    return ", ".join(str(v) for v in values[:5]) + (" ..." if len(values) > 5 else "")


def _raise_layout_error(shape: tuple[int, ...], tshape: tuple[int, ...]) -> None:
    """Only on the error path: a target that fits a ``pred`` without its batch dimension, or one whose
    channels are last, means ``pred`` is what is wrong (it is read as (B, C, *spatial))."""
    if tshape in (shape[1:], (1, *shape[1:])) and len(shape) >= 3:
        raise ValueError(
            f"pred of shape {shape} looks like it has no batch dimension (it is read as (B, C, *spatial) = "
            f"B {shape[0]}, C {shape[1]}, spatial {shape[2:]}) while target has shape {tshape}: add one, e.g. "
            "pred[None] (and target[None] if the target lacks it too)"
        )
    batch, spatial_last = shape[0], shape[1:-1]
    if len(shape) >= 3 and tshape in ((batch, *spatial_last), (batch, 1, *spatial_last)):
        channels_first = (batch, shape[-1], *spatial_last)
        raise ValueError(
            f"pred of shape {shape} looks channels-last (B, *spatial, C) while target has shape {tshape}: segloss "
            f"reads pred as (B, C, *spatial); move the channels with pred.movedim(-1, 1) (shape {channels_first})"
        )


def _integer_one_hot_hint(shape: tuple[int, ...], tshape: tuple[int, ...]) -> str:
    """An integer target of pred's shape (or channels-last) is an integer one-hot, as F.one_hot returns."""
    channels_last = (shape[0], *shape[2:], shape[1])
    if tshape == shape:
        return "; it looks like an integer one-hot target: pass target.float() (or the labels, target.argmax(1))"
    if tshape == channels_last:
        return (
            "; it looks like an integer one-hot target in the channels-last layout F.one_hot returns: pass "
            "target.movedim(-1, 1).float() (or the labels themselves)"
        )
    return ""


def validate_inputs(
    pred: Array,
    target: Array,
    mask: Array | None,
    plan: LossPlan,
    *,
    check_label_values: bool = True,
    activation: str | None = None,
) -> PreparedInputs:
    """Check ``pred``/``target``/``mask`` against the contract and the plan's parameters.

    Raises ``TypeError`` for wrong kinds (integer predictions, non-arrays) and
    ``ValueError`` for shapes, devices and values; the message names the argument, what
    was expected and what was given.
    """
    xp = _namespace("pred", pred)
    activation = activation or plan.activation
    ignore_index = plan.ignore_index
    shape = _shape(pred)
    if not xp.isdtype(pred.dtype, "real floating"):
        raise TypeError(
            f"pred must be floating point (logits or probabilities), got dtype {_dtype_name(pred)}; "
            "integer predictions usually mean argmax labels were passed instead of the network output"
        )
    min_spatial = max(term.spec.min_spatial_dims for term in plan.terms)
    if len(shape) < 2 + min_spatial or len(shape) > 5:
        hint = "" if min_spatial == 0 or len(shape) != 2 else f" (loss {plan.name!r} needs a spatial dim; (B, C) "
        hint += "inputs suit the voxelwise losses: cross_entropy, bce, focal, topk_ce)" if hint else ""
        raise ValueError(
            f"pred must have shape (B, C, *spatial) with {min_spatial} to 3 spatial dims, got shape {shape}{hint}"
        )
    if any(s == 0 for s in shape):
        raise ValueError(f"pred is empty (shape {shape}); every dimension must be at least 1")
    batch, channels, spatial = shape[0], shape[1], shape[2:]
    if activation == "softmax" and channels == 1:
        raise ValueError(
            "activation='softmax' with a single channel is constant 1; use activation='sigmoid' for binary "
            f"segmentation with one output channel (pred shape {shape})"
        )

    regions = plan.regions
    if regions is not None and channels != len(regions):
        raise ValueError(
            f"loss {plan.name!r}: regions names {len(regions)} region{'s' if len(regions) != 1 else ''} {regions} but "
            f"pred has {channels} channel{'s' if channels != 1 else ''} (shape {shape}); give one output channel per "
            "region"
        )

    # target ------------------------------------------------------------------------------
    _namespace("target", target)
    _same_library_and_device("target", target, pred)
    tshape = _shape(target)
    labels = probabilities = None
    if xp.isdtype(target.dtype, "integral") or xp.isdtype(target.dtype, "bool"):
        if tshape == (batch, *spatial):
            labels = target
        elif tshape == (batch, 1, *spatial):
            labels = xp.reshape(target, (batch, *spatial))
        else:
            _raise_layout_error(shape, tshape)
            raise ValueError(
                f"integer target must have shape (B, *spatial) = {(batch, *spatial)} or (B, 1, *spatial) = "
                f"{(batch, 1, *spatial)} for pred of shape {shape}; got {tshape}" + _integer_one_hot_hint(shape, tshape)
            )
        if xp.isdtype(labels.dtype, "bool"):
            labels = xp.astype(labels, xp.int64)
        valid_max = 2 if (activation != "softmax" and channels == 1) else channels
        if regions is not None:
            valid_max = largest_label(regions) + 1
        if check_label_values:
            problem = label_range_error(labels, xp, valid_max, ignore_index)
            if problem is not None:
                extra = f" or ignore_index={ignore_index}" if ignore_index is not None else ""
                what = (
                    f"the largest label regions= names is {valid_max - 1}"
                    if regions is not None
                    else f"pred has {channels} channel{'s' if channels > 1 else ''}"
                )
                raise ValueError(f"target has labels outside [0, {valid_max}){extra}: found {problem} ({what})")
    elif xp.isdtype(target.dtype, "real floating"):
        if regions is not None:
            raise ValueError(
                f"loss {plan.name!r}: regions= computes each channel's target from an integer label map; got a "
                f"floating target of dtype {_dtype_name(target)} (pass the labels (B, *spatial), or drop regions= "
                "and pass the region one-hot target itself)"
            )
        if tshape == shape:
            probabilities = target
        elif channels == 1 and tshape == (batch, *spatial):
            probabilities = xp.reshape(target, shape)
        elif tshape in ((batch, *spatial), (batch, 1, *spatial)):
            raise ValueError(
                f"target is a floating label map of shape {tshape} but pred has {channels} channels; pass integer "
                "labels (e.g. target.long()) or a one-hot/soft target of shape " + f"{shape}"
            )
        else:
            _raise_layout_error(shape, tshape)
            raise ValueError(f"floating (one-hot/soft) target must have the shape of pred {shape}; got {tshape}")
        if ignore_index is not None:
            raise ValueError(
                "ignore_index applies to integer label targets; for one-hot/soft targets pass mask= "
                "(0 on the voxels to ignore) instead"
            )
    else:
        raise TypeError(
            f"target must be integer labels or floating one-hot/soft targets, got dtype {_dtype_name(target)}"
        )

    # mask --------------------------------------------------------------------------------
    canonical_mask = None
    if mask is not None:
        _namespace("mask", mask)
        _same_library_and_device("mask", mask, pred)
        mshape = _shape(mask)
        if len(mshape) == len(shape) - 1:
            mshape = (mshape[0], 1, *mshape[1:])
            mask = xp.reshape(mask, mshape)
        if (
            len(mshape) != len(shape)
            or mshape[0] not in (1, batch)
            or mshape[1] not in (1, channels)
            or tuple(mshape[2:]) != tuple(spatial)
        ):
            raise ValueError(
                f"mask must have shape (B, *spatial), (B, 1, *spatial) or (B, C, *spatial) (B may be 1) "
                f"for pred of shape {shape}; got {_shape(mask) if mask is not None else None}"
            )
        if not (xp.isdtype(mask.dtype, "bool") or xp.isdtype(mask.dtype, "real floating")):
            raise TypeError(f"mask must be bool or floating point, got dtype {_dtype_name(mask)}")
        canonical_mask = mask

    # per-class parameters ------------------------------------------------------------------
    for term in plan.terms:
        for param in term.spec.params:
            value = term.params.get(param.name)
            if value is None:
                continue
            if param.name in ("class_weights", "pos_weight") and len(value) != channels:
                raise ValueError(
                    f"loss {term.spec.name!r}: {param.name} has {len(value)} entries but pred has {channels} "
                    "channels; give one value per channel (background included)"
                )
            if param.name == "classes" and max(value) >= channels:
                raise ValueError(
                    f"loss {term.spec.name!r}: classes={list(value)} names a channel >= {channels} (pred has "
                    f"{channels} channels)"
                )
    return PreparedInputs(
        pred=pred,
        labels=labels,
        target=probabilities,
        mask=canonical_mask,
        num_classes=channels,
        ignore_index=ignore_index,
        activation=activation,
        regions=regions,
    )
