"""Fused statistics through the C++/CUDA extension (``torch.ops.segloss.region_stats``).

One read of the logits (and labels, and the fields of the distance losses) computes every region
statistic, the cross-entropy sums and the field statistics Σ w·p·φ and Σ w·(p − g)²·F for all
classes — activation, one-hot (or, with ``regions=``, each channel's region membership from a
small table), ignore mask and voxel weights on the fly, nothing of size B·C·N
stored. The backward op recomputes what it needs from the inputs and writes
only the gradient. The op's schema, fake (meta) kernel and autograd are in :mod:`.ops`, so it
works under ``torch.compile(fullgraph=True)`` without graph breaks, on either CUDA path.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterable
from typing import Any

import torch

from segloss_core.statistics import ACTIVATION_CODES, FUSED_NUM_SLOTS, FUSED_SLOTS, fused_fields, fused_slot
from segloss_core.validation import PreparedInputs

from . import build, native, ops

# slot of each statistic in the op's (B, C, 12) output (csrc/kernels/region_stats.cuh)
SLOTS = FUSED_SLOTS
NUM_SLOTS = FUSED_NUM_SLOTS
ACTIVATIONS = ACTIVATION_CODES
ops.define()  # schemas, fake kernels and autograd: present before (and without) any compiled library


def prepare() -> build.BuildState:
    """Settle the build and load of the kernels now (losses call this when constructed, so that
    ``forward`` — and a ``torch.compile`` trace of it — never builds or takes a lock)."""
    return build.load()


def is_built() -> bool:
    """The CPU kernels are loaded (after settling the build if that has not happened yet)."""
    return build.load().loaded


def available_on(device_type: str) -> bool:
    """The fused kernels can run on tensors of this device type (``cpu`` or ``cuda``)."""
    state = build.load()
    if device_type == "cpu":
        return state.loaded
    if device_type == "cuda":
        return state.with_cuda
    return False


@functools.cache
def _host_cache_function(library: str) -> Any:
    function = ctypes.CDLL(library).segloss_host_cache  # the loaded library: dlopen returns its handle
    function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int64
    return function


def _host_cache(release: bool) -> int:
    state = build.status()
    if not state.loaded or state.library is None:
        return 0
    return int(_host_cache_function(state.library)(int(release)))


def host_cache_bytes() -> int:
    """Bytes of the freed CPU blocks the fused kernels keep for their next large outputs (the
    gradient, the distance maps: ``csrc/torch/host_buffers.cpp``), 0 without a loaded library.

    A block that a step frees is taken again by the next step's output of about its size, its
    pages resident, instead of a fresh mapping whose every page faults in when first written
    (0.3–0.7 ms per MB measured: as long as a bfloat16 Dice+CE step computes). At most
    ``SEGLOSS_HOST_CACHE_MB`` (default 1024; 0 turns the cache off) are kept; a request no free
    block fits unmaps them all first, so a step's peak memory is the one it has without the cache
    when its sizes repeat. Like ``torch.cuda.memory_reserved() - memory_allocated()`` on a GPU."""
    return _host_cache(False)


def empty_host_cache() -> int:
    """Unmap the freed blocks of :func:`host_cache_bytes` (as ``torch.cuda.empty_cache()``);
    returns the bytes released."""
    return _host_cache(True)


def status_lines() -> dict[str, str]:
    """State and reason of each part, for ``segloss backends`` (``fused CPU``, ``fused CUDA``)."""
    state = build.status()
    if not state.attempted:
        cached = build.cached_library()
        cpu = (
            f"built (cached at {cached.parent}); loaded on first use"
            if cached is not None
            else "not built yet (compiled when a loss is first constructed, about a minute; `segloss build` prebuilds)"
        )
        return {"fused CPU": cpu, "fused CUDA": "settled when a loss is first constructed"}
    cpu = f"active ({state.library})" if state.loaded else f"unavailable: {state.error} (native path in use)"
    if state.with_cuda:
        arch = f", arch {state.arch_list}" if state.arch_list and state.cuda_path == "nvcc" else ""
        how = "nvcc-built library" if state.cuda_path == "nvcc" else "NVRTC, compiled at run time"
        note = f" (nvcc not used: {state.cuda_error})" if state.cuda_error else ""
        cuda = f"active ({how}{arch}){note}"
    else:
        cuda = f"unavailable: {state.cuda_error}"
    return {"fused CPU": cpu, "fused CUDA": cuda}


def status_line() -> str:
    """One line: what is active (``describe`` shows it)."""
    state = build.status()
    if not state.attempted:
        return status_lines()["fused CPU"]
    if state.loaded or state.with_cuda:
        devices = " + ".join(d for d, on in (("CPU", state.loaded), ("CUDA", state.with_cuda)) if on)
        path = f" via {state.cuda_path}" if state.with_cuda else ""
        arch = f", CUDA arch {state.arch_list}" if state.arch_list and state.cuda_path == "nvcc" else ""
        return f"active ({devices}{path}{arch})"
    return f"unavailable: {state.error} (native path in use)"


def fusable(names: Iterable[str]) -> bool:
    """The kernels compute all of ``names`` (field statistics: one field of each kind)."""
    return fused_fields(names) is not None


def _unsupported_reason(names: Iterable[str], prepared: PreparedInputs | None) -> str | None:
    names = set(names)
    if not fusable(names):
        extra = sorted(n for n in names if fused_fields([n]) is None)
        if extra:
            return f"statistics {extra} are not fused (native only)"
        return f"statistics {sorted(names - set(SLOTS))} need several fields of one kind (native only)"
    if prepared is not None:
        if prepared.mask is not None and int(prepared.mask.shape[1]) != 1:
            return "per-class masks (B, C, ...) are not fused (native only)"
        if prepared.pred.device.type not in ("cpu", "cuda"):
            return f"device {prepared.pred.device.type} has no fused kernel"
        if prepared.pred.device.type == "cpu" and build.status().attempted and not build.status().loaded:
            return f"no fused CPU kernels: {build.status().error}"
        if prepared.pred.device.type == "cuda" and not build.status().with_cuda:
            return f"no fused CUDA kernels: {build.status().cuda_error}"
    return None


def applicable(names: Iterable[str], plan: Any, prepared: PreparedInputs | None) -> bool:
    """impl='auto': use the fused kernels when they are built and cover the request."""
    if prepared is None:
        return _unsupported_reason(names, None) is None and (is_built() or build.status().with_cuda)
    return _unsupported_reason(names, prepared) is None and available_on(prepared.pred.device.type)


def require(names: Iterable[str], plan: Any) -> None:
    """impl='fused': raise now (at get_loss time) if the fused path cannot serve this loss."""
    reason = _unsupported_reason(names, None)
    if reason is not None:
        raise ValueError(f"impl='fused' cannot compute loss {plan.name!r}: {reason}; use impl='auto' or 'native'")
    state = prepare()
    if not (state.loaded or state.with_cuda):
        raise RuntimeError(f"impl='fused' requested but the extension is not available: {state.error}")


def compute_statistics(prepared: PreparedInputs, names: Iterable[str]) -> dict[str, torch.Tensor]:
    names = set(names)
    reason = _unsupported_reason(names, prepared)
    if reason is not None:
        raise ValueError(f"impl='fused': {reason}")
    pred = prepared.pred
    mask = prepared.mask
    if mask is not None:
        mask = mask.reshape(mask.shape[0], -1)  # the op casts it to the accumulation dtype
    labels = prepared.labels
    target = prepared.target
    if pred.dim() == 2:  # (B, C) classification-style inputs: one voxel per sample for the kernels
        pred = pred.unsqueeze(-1)
        labels = None if labels is None else labels.unsqueeze(-1)
        target = None if target is None else target.unsqueeze(-1)
    ignore = prepared.ignore_index
    regions = None if prepared.regions is None else native.membership_table(prepared.regions, pred.device)
    fields = fused_fields(names) or {}
    field_pred, field_sq_err = (
        None
        if kind not in fields
        else native.field(prepared, fields[kind], tuple(pred.shape), ops.accumulation_dtype(pred.dtype))
        for kind in ("field_pred_sum", "field_sq_err_sum")
    )
    stats = torch.ops.segloss.region_stats(
        pred,
        labels,
        target,
        mask,
        ACTIVATIONS[prepared.activation],
        0 if ignore is None else int(ignore),
        ignore is not None,
        "ce_neg" in names,
        torch.compiler.is_compiling(),
        regions,
        field_pred,
        field_sq_err,
    )
    return {name: stats[:, :, fused_slot(name)] for name in names}
