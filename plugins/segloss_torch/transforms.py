"""Dictionary transforms for data pipelines (MONAI-style, without depending on MONAI).

:class:`SignedDistanceMapd` adds the signed distance map of a label image to a sample
dictionary. Put it **before** the random crop, listing the map's key among the crop's keys: the
map is then computed once on the whole volume and cropped with the image, so every patch
voxel carries its true distance to the nearest boundary, which may lie outside the patch. A map
computed on the patch itself is wrong near the patch border and is 0 everywhere for a class the
volume has but the patch lacks (``docs/distance_maps.md``, "Maps of patches", gives the
measured error and the cost).

>>> import torch
>>> labels = torch.zeros(1, 6, 8, dtype=torch.long)  # (1, H, W): channel-first, as MONAI loads it
>>> labels[0, 2:4, 3:6] = 1
>>> sample = SignedDistanceMapd("label", num_classes=2, spacing=(1.0, 2.0))({"label": labels})
>>> sample["label_distance_map"].shape  # (C, H, W), float32, on the label's device
torch.Size([2, 6, 8])
>>> sample["label_distance_map"][1, 2].tolist()
[6.0, 4.0, 2.0, -0.0, -0.0, -0.0, 2.0, 4.0]
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from segloss_core.arrays import get_namespace
from segloss_core.distance_maps import CONVENTIONS, check_spacing
from segloss_core.validation import label_range_error

from .distance_maps import signed_distance_map

__all__ = ["SignedDistanceMapd", "spacing_from_metadata"]

META_SUFFIX = "_meta_dict"
"""MONAI's older layout keeps a key's metadata under ``key + "_meta_dict"`` (``meta_key_postfix``)."""


class SignedDistanceMapd:
    """Add ``data[output_key]``, the signed distance map (C, *spatial) float32 of ``data[key]``.

    ``keys``: one key or several, each a channel-first label image (1, *spatial) (as MONAI's
    ``LoadImaged`` + ``EnsureChannelFirstd`` give it), integer or integral float,
    a torch tensor (a MONAI ``MetaTensor`` included) or a NumPy array. ``num_classes``: C.
    ``output_keys``: where the maps go (default ``key + "_distance_map"``). ``convention``,
    ``normalize``, ``ignore_index``: as :func:`segloss_torch.signed_distance_map`.

    Spacing, first that applies: ``spacing=`` (a number or one per spatial axis); else the
    label's metadata, :func:`spacing_from_metadata` (the ``affine`` of a ``MetaTensor``'s
    ``.meta``, or of ``data[key + "_meta_dict"]``; else their NIfTI ``pixdim``); else 1 per axis
    when ``require_spacing=False`` (the default is to raise rather than silently measure in voxels).

    ``device``: where the EDT runs (e.g. ``"cuda"``); the label is moved there and the map stays
    there (default: the label's own device; NumPy labels: the CPU). The map is the one of the
    whole volume: crop after this transform, with the map's key among the crop's keys.
    """

    def __init__(
        self,
        keys: Hashable | Sequence[Hashable],
        num_classes: int,
        *,
        output_keys: Hashable | Sequence[Hashable] | None = None,
        spacing: float | Sequence[float] | None = None,
        require_spacing: bool = True,
        convention: str = "boundary_loss",
        normalize: str | None = None,
        ignore_index: int | None = None,
        device: str | torch.device | None = None,
        allow_missing_keys: bool = False,
    ):
        self.keys = _as_keys(keys)
        if output_keys is None:
            self.output_keys = tuple(f"{key}_distance_map" for key in self.keys)
        else:
            self.output_keys = _as_keys(output_keys)
            if len(self.output_keys) != len(self.keys):
                raise ValueError(f"output_keys has {len(self.output_keys)} keys for {len(self.keys)} keys")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
        if spacing is not None:
            check_spacing(spacing, 1 if isinstance(spacing, (int, float)) else len(spacing))
        self.num_classes = num_classes
        self.spacing = spacing
        self.require_spacing = require_spacing
        self.convention = convention
        self.normalize = normalize
        self.ignore_index = ignore_index
        self.device = None if device is None else torch.device(device)
        self.allow_missing_keys = allow_missing_keys

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key, output_key in zip(self.keys, self.output_keys, strict=True):
            if key not in data:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"SignedDistanceMapd: key {key!r} is not in the sample (keys: {sorted(map(str, data))})")
            out[output_key] = self.map_of(data[key], data.get(f"{key}{META_SUFFIX}"), key)
        return out

    def map_of(self, label: Any, meta: Mapping[str, Any] | None = None, key: Hashable = "label") -> torch.Tensor:
        """The map (C, *spatial) of one label image (1, *spatial)."""
        labels = _as_label_tensor(label, key, self.device)
        problem = label_range_error(labels, get_namespace(labels), self.num_classes, self.ignore_index)
        if problem is not None:
            extra = f" or ignore_index={self.ignore_index}" if self.ignore_index is not None else ""
            raise ValueError(f"{key!r} has labels outside [0, {self.num_classes}){extra}: found {problem}")
        ndim = labels.dim() - 1
        spacing = self.spacing
        if spacing is None:
            spacing = spacing_from_metadata(label, meta, ndim)
        if spacing is None and self.require_spacing:
            raise ValueError(
                f"SignedDistanceMapd: no voxel spacing for {key!r}: the label carries no affine or pixdim metadata; "
                "pass spacing=... (or require_spacing=False to measure distances in voxels)"
            )
        maps = signed_distance_map(
            labels,
            self.num_classes,
            spacing,
            convention=self.convention,
            normalize=self.normalize,
            ignore_index=self.ignore_index,
        )
        return maps[0]


def spacing_from_metadata(label: Any, meta: Mapping[str, Any] | None, ndim: int) -> tuple[float, ...] | None:
    """The voxel size of ``label``'s first ``ndim`` spatial axes from its metadata, or None.

    Looked for in ``label.meta`` (a MONAI ``MetaTensor``) and then ``meta`` (``data[key +
    "_meta_dict"]``): an ``affine`` gives the column norms of its top-left ``ndim`` × ``ndim``
    block (as MONAI's ``affine_to_spacing``), a NIfTI ``pixdim`` gives ``pixdim[1 : 1 + ndim]``.

    >>> spacing_from_metadata(None, {"affine": np.diag([0.8, 0.8, 2.5, 1.0])}, 3)
    (0.8, 0.8, 2.5)
    >>> spacing_from_metadata(None, {"pixdim": [1.0, 0.5, 0.5, 3.0, 0, 0, 0, 0]}, 3)
    (0.5, 0.5, 3.0)
    """
    for source in (getattr(label, "meta", None), meta):
        if not isinstance(source, Mapping):
            continue
        if source.get("affine") is not None:
            affine = np.asarray(_to_numpy(source["affine"]), dtype=np.float64)
            if affine.ndim == 2 and min(affine.shape) > ndim:
                return tuple(float(v) for v in np.sqrt((affine[:ndim, :ndim] ** 2).sum(axis=0)))
        if source.get("pixdim") is not None:
            pixdim = np.asarray(_to_numpy(source["pixdim"]), dtype=np.float64).reshape(-1)
            if pixdim.size > ndim:
                return tuple(float(v) for v in pixdim[1 : 1 + ndim])
    return None


def _as_keys(keys: Hashable | Sequence[Hashable]) -> tuple[Hashable, ...]:
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
        return (keys,)
    if not keys:
        raise ValueError("keys must name at least one key")
    return tuple(keys)


def _to_numpy(value: Any) -> Any:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def _as_label_tensor(label: Any, key: Hashable, device: torch.device | None) -> torch.Tensor:
    """The (1, *spatial) label image as integer labels of a batch of one, a plain torch tensor on ``device``."""
    if isinstance(label, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(label))
    elif isinstance(label, torch.Tensor):
        tensor = label.as_subclass(torch.Tensor)  # a MetaTensor's metadata stays with the caller's object
    else:
        raise TypeError(f"{key!r} must be a torch tensor or a NumPy array, got {type(label).__name__}")
    if device is not None:
        tensor = tensor.to(device)
    if not 2 <= tensor.dim() <= 4 or tensor.shape[0] != 1:
        raise ValueError(
            f"{key!r} must be a channel-first label image (1, *spatial) with 1 to 3 spatial dims, got shape "
            f"{tuple(tensor.shape)} (a label map without its channel axis: add it, label[None])"
        )
    if tensor.is_floating_point():
        if not bool(torch.all(tensor == torch.round(tensor))):
            raise ValueError(f"{key!r} holds non-integer values; a label image holds class indices")
        tensor = tensor.to(torch.int64)
    elif tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8)
    return tensor
