"""Signed distance maps of every class of a label map: segloss against per-class peers.

All implementations compute the same (K, *spatial) maps in the boundary-loss convention
(LIVIAETS ``one_hot2dist``: −(d_in − 1) inside, +d_out outside, 0 for a class without a
boundary), as ``benchmarks/distance_maps.py``: segloss in one call (``signed_distance_map``,
the exact multi-label EDT kernels), scipy's ``distance_transform_edt`` per class (inside and
outside), seung-lab ``edt`` per class (all cores), cupyx per class on the GPU. The label map
(``common.label_map``) is made of smooth blobs, every class present.
"""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np
import torch

from .common import Benchmark, label_map, peer, require_fused, safe_import, skip_if_no_cuda, synchronize

with safe_import():
    import cupy
    from cupyx.scipy.ndimage import distance_transform_edt as cupyx_edt

VOLUMES = ["512x512", "128x128x128"]
SPACINGS = ["isotropic", "anisotropic"]
CLASSES = [2, 4, 14]
ANISOTROPIC = {2: (0.8, 2.5), 3: (0.8, 0.8, 2.5)}  # e.g. CT: fine in-plane, thick slices


def spacing_of(spacing: str, ndim: int) -> tuple[float, ...]:
    return (1.0,) * ndim if spacing == "isotropic" else ANISOTROPIC[ndim]


def scipy_one_hot2dist(labels: np.ndarray, k: int, spacing: tuple[float, ...]) -> np.ndarray:
    edt = peer("scipy_ndimage").distance_transform_edt
    out = np.zeros((k, *labels.shape), dtype=np.float32)
    for c in range(k):
        pos = labels == c
        if pos.any() and not pos.all():
            neg = ~pos
            out[c] = edt(neg, sampling=spacing) * neg - (edt(pos, sampling=spacing) - 1) * pos
    return out


def seunglab_one_hot2dist(labels: np.ndarray, k: int, spacing: tuple[float, ...]) -> np.ndarray:
    edt = peer("seunglab_edt")
    threads = os.cpu_count() or 1
    out = np.zeros((k, *labels.shape), dtype=np.float32)
    for c in range(k):
        pos = labels == c
        if pos.any() and not pos.all():
            inside = edt.edt(pos, anisotropy=spacing, parallel=threads)
            outside = edt.edt(~pos, anisotropy=spacing, parallel=threads)
            out[c] = np.where(pos, -(inside - 1), outside)
    return out


def cupyx_one_hot2dist(labels, k: int, spacing: tuple[float, ...]):
    out = cupy.zeros((k, *labels.shape), dtype=cupy.float32)
    for c in range(k):
        pos = labels == c
        if bool(pos.any()) and not bool(pos.all()):
            out[c] = cupy.where(pos, -(cupyx_edt(pos, sampling=spacing) - 1), cupyx_edt(~pos, sampling=spacing))
    return out


class DistanceMapCPU(Benchmark):
    """Seconds for the signed maps of all K classes of one volume (B = 1)."""

    version = "1"  # bump when the workload (volume, convention, what is timed) changes
    device = "cpu"
    params: ClassVar[list] = [["segloss", "scipy", "edt"], VOLUMES, SPACINGS, CLASSES]
    param_names: ClassVar[list] = ["implementation", "volume", "spacing", "classes"]

    def setup(self, cache, implementation, volume, spacing, classes):
        if self.device == "cuda":
            skip_if_no_cuda()
        key = (implementation, volume, spacing, classes)
        if getattr(self, "_key", None) == key:  # asv re-runs setup before every sample
            return
        spatial = tuple(int(s) for s in volume.split("x"))
        self.spacing = spacing_of(spacing, len(spatial))
        self.k = classes
        labels = label_map(spatial, classes).astype(np.int64)
        if implementation == "segloss":
            require_fused(cache)  # without it segloss falls back to the scipy reference
            from segloss_torch import signed_distance_map

            tensor = torch.from_numpy(labels)[None].to(self.device)
            self.fn = lambda: signed_distance_map(tensor, self.k, self.spacing)
        elif implementation == "scipy" and self.device == "cpu":
            if peer("scipy_ndimage") is None:
                raise NotImplementedError("scipy is not installed")
            self.fn = lambda: scipy_one_hot2dist(labels, self.k, self.spacing)
        elif implementation == "edt" and self.device == "cpu":
            if peer("seunglab_edt") is None:
                raise NotImplementedError("seung-lab edt is not installed")
            self.fn = lambda: seunglab_one_hot2dist(labels, self.k, self.spacing)
        elif implementation == "segloss-cupy" and self.device == "cuda":
            try:
                from segloss_cupy import signed_distance_map as cupy_signed_distance_map

                on_gpu = cupy.asarray(labels)[None]
            except (ImportError, NameError) as exc:
                raise NotImplementedError("cupy is not installed") from exc
            self.fn = lambda: cupy_signed_distance_map(on_gpu, self.k, self.spacing)
        elif implementation == "cupyx" and self.device == "cuda":
            try:
                on_gpu = cupy.asarray(labels)
            except NameError as exc:
                raise NotImplementedError("cupy is not installed") from exc
            self.fn = lambda: cupyx_one_hot2dist(on_gpu, self.k, self.spacing)
        else:
            raise NotImplementedError(f"{implementation} does not run on {self.device}")
        self._key = key

    def time_signed_distance_map(self, cache, implementation, volume, spacing, classes):
        self.fn()
        synchronize(self.device)
        if implementation in ("cupyx", "segloss-cupy"):
            cupy.cuda.Device().synchronize()


class DistanceMapCUDA(DistanceMapCPU):
    """As DistanceMapCPU on the GPU: segloss through torch and through CuPy (one call, all classes)
    against cupyx per class."""

    version = "1"
    device = "cuda"
    params: ClassVar[list] = [["segloss", "segloss-cupy", "cupyx"], VOLUMES, SPACINGS, CLASSES]
