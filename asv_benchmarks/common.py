"""Shared pieces of the segloss asv suite (see docs/benchmarks.md).

- :class:`Benchmark`: base class of every benchmark class (timing defaults, the one
  ``setup_cache`` that builds the fused extension);
- :func:`safe_import`: import a peer if it is installed, leave it out otherwise;
- :func:`skip_if_no_cuda`: raise ``NotImplementedError`` (asv: "skipped") without a GPU;
- seeded input factories: :func:`label_map` (smooth blobs, every class present),
  :func:`loss_inputs` (logits that resemble the labels, plus noise);
- :func:`make_loss`: a callable ``loss(logits, labels)`` for segloss (fused/native) and each peer;
- extra peak memory: :func:`extra_peak_bytes` (CPU: VmHWM reset through /proc/self/clear_refs,
  as ``benchmarks/compare.py``; CUDA: ``torch.cuda.max_memory_allocated``).

Nothing here touches CUDA at import time: asv's forkserver imports this module once and forks
a process per benchmark, and a CUDA context created before a fork is unusable in the child.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
import warnings
from collections.abc import Callable, Iterator

import numpy as np

# torch.cuda.is_available() through NVML: never initialises the CUDA driver in the forkserver
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import torch

warnings.simplefilter("ignore")


@contextlib.contextmanager
def safe_import() -> Iterator[None]:
    """``with safe_import(): import peer`` — a missing (or broken) peer leaves its name unbound."""
    with contextlib.suppress(ImportError):
        yield


with safe_import():
    import monai.losses as monai_losses  # noqa: F401
with safe_import():
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.helpers import softmax_helper_dim1
with safe_import():
    import scipy.ndimage as scipy_ndimage  # noqa: F401
with safe_import():
    import edt as seunglab_edt  # noqa: F401


def peer(name: str):
    """The imported peer module ``name`` or None."""
    return globals().get(name)


# ---------------------------------------------------------------------------------------------
# the parameter grid (stable: the values are the result keys of asv's history)

LOSSES = ["dice", "dice_ce", "generalized_dice", "tversky", "boundary", "boundary_precomputed", "hausdorff_dt"]
IMPLEMENTATIONS = ["segloss-fused", "segloss-native", "monai", "nnunet"]
IMPLEMENTATIONS_CUDA = [*IMPLEMENTATIONS, "segloss-cupy"]  # the CuPy backend on the same (DLPack) arrays
# B×C×spatial: 2D 512² (C = 4), 3D 64³ (C = 2), 3D 128³ (C = 14, 117 MB of float32 logits: the
# largest, where bytes moved decide; benchmarks/compare.py also has 2×4×128³)
SHAPES = ["4x4x512x512", "2x2x64x64x64", "1x14x128x128x128"]
DTYPES = ["float32", "bfloat16", "float16", "float64"]

# Peers that compute distance maps with one scipy EDT per (sample, class, prediction/target,
# inside/outside) — MONAI HausdorffDTLoss takes 12 s a call at 2×4×128³ on 2 cores — run up to
# this many B·C·N elements (4×4×512² and 2×2×64³; 1×14×128³ is skipped for them).
PEER_DISTANCE_MAP_CAP = 2**22

SEED = 20251123


def parse_shape(shape: str) -> tuple[int, ...]:
    return tuple(int(s) for s in shape.split("x"))


def _relaxed_setup_cache_timeout(fn):
    fn.timeout = 1200  # the first JIT build of the fused extension takes ~1 min on 2 cores
    return fn


class Benchmark:
    """Base class of the suite (numpy/scipy's convention).

    Every workload takes far more than asv's 10 ms sample time, so each sample is one call;
    ``repeat = (min, max, seconds)``: at least 3 samples, at most 10, within 20 s, after asv's
    warm-up (at least one call; none under ``--quick``).
    ``setup_cache`` is defined once, here, so all classes share one cache key and the fused
    extension is built (JIT, ~1 min the first time; then loaded from ~/.cache/segloss) once per
    ``asv run``, outside every timed body.
    """

    number = 1
    repeat = (3, 10, 20.0)
    timeout = 240

    @_relaxed_setup_cache_timeout
    def setup_cache(self):
        from segloss_torch import build

        state = build.load()
        return {"fused": bool(state.loaded), "error": state.error}


def skip_if_no_cuda() -> None:
    """asv marks a benchmark skipped (n/a) when setup raises NotImplementedError."""
    if not torch.cuda.is_available():
        raise NotImplementedError("no CUDA device")


def require_fused(cache: dict) -> None:
    if not cache.get("fused"):
        raise NotImplementedError(f"fused extension unavailable: {cache.get('error')}")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# inputs (seeded, deterministic)


def label_map(spatial: tuple[int, ...], num_classes: int, seed: int = SEED) -> np.ndarray:
    """A uint8 label map of smooth ellipsoidal blobs (1..C−1) on background 0, every class present:
    like an organ segmentation, so distance maps and thresholded predictions are realistic."""
    rng = np.random.default_rng(seed)
    size = np.asarray(spatial, dtype=np.float64)
    grids = np.ogrid[tuple(slice(0, s) for s in spatial)]
    labels = np.zeros(spatial, dtype=np.uint8)

    def paint(k: int, scale: tuple[float, float]) -> None:
        centre = rng.uniform(0.2, 0.8, len(spatial)) * size
        radii = rng.uniform(*scale, len(spatial)) * size
        r = sum(((g - c) / rr) ** 2 for g, c, rr in zip(grids, centre, radii, strict=True))
        labels[r < 1.0] = k

    for k in range(1, num_classes):  # large first, later (smaller) classes on top
        paint(k, (0.3 - 0.2 * k / num_classes, 0.35 - 0.2 * k / num_classes))
    for _ in range(100):  # a class painted over completely: a small blob of it again
        missing = sorted(set(range(1, num_classes)) - set(np.unique(labels).tolist()))
        if not missing:
            break
        for k in missing:
            paint(k, (0.03, 0.06))
    labels[(0,) * len(spatial)] = 0  # a corner is always background
    return labels


def labels_tensor(shape: tuple[int, ...], device: str = "cpu") -> torch.Tensor:
    """int64 labels (B, *spatial), one blob map per sample."""
    b, c, *spatial = shape
    maps = np.stack([label_map(tuple(spatial), c, SEED + i) for i in range(b)])
    return torch.from_numpy(maps).to(device=device, dtype=torch.int64)


def loss_inputs(shape: tuple[int, ...], device: str = "cpu", dtype: str = "float32"):
    """(logits, labels): logits = N(0, 1) noise + 3 on each voxel's labelled channel, so softmax
    probabilities and thresholded predictions look like a half-trained network's."""
    labels = labels_tensor(shape, device)
    gen = torch.Generator(device=device).manual_seed(SEED)
    logits = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    logits.scatter_add_(1, labels[:, None], torch.full_like(labels[:, None], 3.0, dtype=torch.float32))
    return logits.to(getattr(torch, dtype)).contiguous(), labels


# ---------------------------------------------------------------------------------------------
# losses: segloss and its peers, each as loss(logits, labels) -> scalar


def check_combination(loss: str, implementation: str, shape: tuple[int, ...]) -> None:
    """Raise NotImplementedError (asv: skipped) for a combination that does not exist, before any
    input is made."""
    if implementation in ("segloss-fused", "segloss-native"):
        return  # every loss; fused computes the distance-map (field) sums natively
    if implementation == "monai":
        if peer("monai_losses") is None:
            raise NotImplementedError("MONAI is not installed")
        if loss not in MONAI_LOSSES:
            raise NotImplementedError(f"MONAI has no {loss} loss")
        if loss == "hausdorff_dt" and int(np.prod(shape)) > PEER_DISTANCE_MAP_CAP:
            raise NotImplementedError(f"MONAI HausdorffDTLoss above the size cap ({PEER_DISTANCE_MAP_CAP} elements)")
        return
    if implementation == "segloss-cupy":
        from segloss_core import list_backends
        from segloss_core.registry import registry

        if not any(b.name == "cupy" and b.available for b in list_backends()):
            raise NotImplementedError("the CuPy backend is not available here")
        reg = registry()
        name = "boundary" if loss == "boundary_precomputed" else loss
        if not reg._supports(reg.backend("cupy"), reg.loss(name)):
            raise NotImplementedError(f"the CuPy backend does not compute {loss}")
        return
    if implementation == "nnunet":
        if peer("MemoryEfficientSoftDiceLoss") is None:
            raise NotImplementedError("nnU-Net is not installed")
        if loss not in ("dice", "dice_ce"):
            raise NotImplementedError(f"nnU-Net has no {loss} loss")
        return
    raise NotImplementedError(f"unknown implementation {implementation!r}")


MONAI_LOSSES = {
    "dice": "DiceLoss",
    "dice_ce": "DiceCELoss",
    "generalized_dice": "GeneralizedDiceLoss",
    "tversky": "TverskyLoss",
    "hausdorff_dt": "HausdorffDTLoss",
}


def make_loss(loss: str, implementation: str, shape: tuple[int, ...], labels: torch.Tensor) -> Callable:
    """A callable ``(logits, labels) -> scalar tensor``, each with its library's defaults (segloss's
    are MONAI's; nnU-Net as its default trainer builds it: no background, smooth 1e-5)."""
    from segloss_core import get_loss

    check_combination(loss, implementation, shape)
    if implementation == "segloss-cupy":
        return _cupy_loss(loss, shape, labels)
    if implementation.startswith("segloss-"):
        impl = implementation.removeprefix("segloss-")
        if loss == "boundary_precomputed":  # the map from `segloss distmap`, not timed
            from segloss_torch import signed_distance_map

            module = get_loss("boundary", backend="torch", impl=impl)
            phi = signed_distance_map(labels, shape[1])
            return lambda x, y: module(x, y, distance_map=phi)
        return get_loss(loss, backend="torch", impl=impl)
    if implementation == "monai":
        module = getattr(peer("monai_losses"), MONAI_LOSSES[loss])(softmax=True, to_onehot_y=True)
        return lambda x, y: module(x, y[:, None])
    kwargs = {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}
    if loss == "dice":
        module = MemoryEfficientSoftDiceLoss(softmax_helper_dim1, **kwargs)
    else:
        module = DC_and_CE_loss(kwargs, {}, dice_class=MemoryEfficientSoftDiceLoss)
    return lambda x, y: module(x, y[:, None])


class _GradientDone:
    """What the CuPy row returns for a step: value and gradient were computed in one call."""

    def backward(self) -> None:
        pass


def _cupy_loss(loss: str, shape: tuple[int, ...], labels: torch.Tensor) -> Callable:
    """The CuPy backend on the torch tensors' memory (DLPack, zero-copy). CuPy allocates through
    torch's caching allocator, so ``max_memory_allocated`` measures it like the torch rows."""
    import cupy

    from segloss_core import get_loss
    from segloss_cupy import use_torch_allocator

    use_torch_allocator()
    inputs = {}
    if loss == "boundary_precomputed":
        from segloss_cupy import signed_distance_map

        inputs["distance_map"] = signed_distance_map(cupy.from_dlpack(labels), shape[1])
        loss = "boundary"
    module = get_loss(loss, backend="cupy")

    def call(x: torch.Tensor, y: torch.Tensor):
        xc, yc = cupy.from_dlpack(x.detach()), cupy.from_dlpack(y)
        if x.requires_grad:
            module.value_and_grad(xc, yc, **inputs)
            return _GradientDone()
        return module(xc, yc, **inputs)

    return call


def step(loss: Callable, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """One training step of the loss alone: forward and backward, a fresh gradient."""
    x = logits.detach().requires_grad_(True)
    loss(x, labels).backward()


def forward(loss: Callable, logits: torch.Tensor, labels: torch.Tensor) -> None:
    with torch.no_grad():
        loss(logits, labels)


# ---------------------------------------------------------------------------------------------
# memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def exact_rss_accounting() -> None:
    """Make the resident set follow the tensors: glibc keeps freed blocks for reuse (resident, so
    a later allocation that reuses them does not raise the peak) unless they were mmap'd. Map
    every block of 128 KiB or more, as ``MALLOC_MMAP_THRESHOLD_=131072`` does for
    ``benchmarks/compare.py`` (here through mallopt: no re-exec). Called by the memory benchmarks
    only (each runs in its own process): the timing benchmarks keep glibc's default behaviour,
    as a training process has it."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 131072)


def reset_peak_rss() -> bool:
    """Reset the process's peak resident set (VmHWM, and so getrusage's ru_maxrss, which asv's
    ``peakmem_`` reports) to the current resident set. False where /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def extra_peak_bytes(fn: Callable[[], None], device: str) -> float:
    """Peak memory of one call of ``fn`` above the memory in use before it, in bytes."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    exact_rss_accounting()
    empty_host_cache()  # before the mark is reset: the blocks it unmaps are not part of the step's peak
    if not reset_peak_rss():
        raise NotImplementedError("/proc/self/clear_refs is not writable: no per-call peak RSS")
    before = _status_kb("VmRSS:")
    fn()
    return float(_status_kb("VmHWM:") - before) * 1024.0


def empty_host_cache() -> None:
    """Unmap the freed blocks the fused CPU kernels keep for reuse (``segloss_torch.fused``'s host
    block cache): resident before a step, they would hide the step's own blocks from the growth of
    the resident set, or count against another implementation."""
    with contextlib.suppress(ImportError):
        from segloss_torch import fused

        fused.empty_host_cache()


def preload_fused_if_built() -> None:
    """Load an already-built fused extension in the importing process (asv's forkserver), so the
    forked benchmark processes do not each load it again; never compiles, never touches CUDA."""
    if torch.version.cuda:  # the build probes the GPU: leave it to the benchmark processes
        return
    with contextlib.suppress(Exception):
        from segloss_torch import build

        if build.cached_library() is not None:
            build.load()


def preload_registry() -> None:
    """Load segloss's plugins and catalog once in the importing process (0.1 s per benchmark else)."""
    with contextlib.suppress(Exception):
        from segloss_core import get_loss

        get_loss("dice", backend="torch", impl="native")


preload_fused_if_built()
preload_registry()
