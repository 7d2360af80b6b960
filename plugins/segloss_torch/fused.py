"""Fused statistics through the C++/CUDA extension (``torch.ops.segloss.region_stats``).

One read of the logits (and labels) computes every region statistic and the cross-entropy
sums for all classes — activation, one-hot, ignore mask and voxel weights on the fly, nothing
of size B·C·N stored. The backward op recomputes what it needs from the inputs and writes
only the gradient. Fake (meta) kernels and autograd are registered here, so the op works
under ``torch.compile(fullgraph=True)`` without graph breaks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from segloss_core.statistics import ACTIVATION_CODES, FUSED_NUM_SLOTS, FUSED_SLOTS
from segloss_core.validation import PreparedInputs

from . import build

# slot of each statistic in the op's (B, C, 10) output (csrc/kernels/region_stats.cuh)
SLOTS = FUSED_SLOTS
NUM_SLOTS = FUSED_NUM_SLOTS
ACTIVATIONS = ACTIVATION_CODES
_REGISTERED = False


def _register_python_parts() -> None:
    """Fake kernels and autograd for the C++ ops (once, after the library is loaded)."""
    global _REGISTERED
    if _REGISTERED:
        return

    @torch.library.register_fake("segloss::region_stats")
    def _fake_forward(logits, labels, target, mask, activation, ignore_index, has_ignore, want_ce_neg, check_labels):
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return logits.new_empty((logits.shape[0], logits.shape[1], NUM_SLOTS), dtype=dtype)

    @torch.library.register_fake("segloss::region_stats_backward")
    def _fake_backward(grad, logits, labels, target, mask, activation, ignore_index, has_ignore):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        logits, labels, target, mask, activation, ignore_index, has_ignore, _want_ce_neg, _check = inputs
        ctx.save_for_backward(logits, labels, target, mask)
        ctx.scalars = (activation, ignore_index, has_ignore)

    def backward(ctx, grad):
        logits, labels, target, mask = ctx.saved_tensors
        activation, ignore_index, has_ignore = ctx.scalars
        grad_logits = torch.ops.segloss.region_stats_backward(
            grad, logits, labels, target, mask, activation, ignore_index, has_ignore
        )
        return grad_logits, None, None, None, None, None, None, None, None

    torch.library.register_autograd("segloss::region_stats", backward, setup_context=setup_context)
    _REGISTERED = True


def is_built() -> bool:
    state = build.load()
    if state.loaded:
        _register_python_parts()
    return state.loaded


def status_line() -> str:
    state = build.status()
    if not state.attempted:
        cached = build.cached_library()
        if cached is not None:
            return f"built (cached at {cached.parent}); loaded on first use"
        return "not built yet (compiled on first use, about a minute; `segloss build` prebuilds)"
    if state.loaded:
        devices = "CPU + CUDA" if state.with_cuda else "CPU"
        arch = f", CUDA arch {state.arch_list}" if state.arch_list else ""
        return f"active ({devices}{arch})"
    return f"unavailable: {state.error} (native path in use)"


def fusable(names: Iterable[str]) -> bool:
    return set(names) <= set(SLOTS)


def _unsupported_reason(names: Iterable[str], prepared: PreparedInputs | None) -> str | None:
    extra = sorted(set(names) - set(SLOTS))
    if extra:
        return f"statistics {extra} are not fused (native only)"
    if prepared is not None:
        if prepared.mask is not None and int(prepared.mask.shape[1]) != 1:
            return "per-class masks (B, C, ...) are not fused (native only)"
        if prepared.pred.device.type not in ("cpu", "cuda"):
            return f"device {prepared.pred.device.type} has no fused kernel"
        if prepared.pred.device.type == "cuda" and not build.status().with_cuda:
            return "the extension was built without CUDA"
    return None


def applicable(names: Iterable[str], plan: Any, prepared: PreparedInputs | None) -> bool:
    """impl='auto': use the fused kernels when they are built and cover the request."""
    return _unsupported_reason(names, prepared) is None and is_built()


def require(names: Iterable[str], plan: Any) -> None:
    """impl='fused': raise now (at get_loss time) if the fused path cannot serve this loss."""
    reason = _unsupported_reason(names, None)
    if reason is not None:
        raise ValueError(f"impl='fused' cannot compute loss {plan.name!r}: {reason}; use impl='auto' or 'native'")
    if not is_built():
        raise RuntimeError(f"impl='fused' requested but the extension is not available: {build.status().error}")


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
    ignore = prepared.ignore_index
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
    )
    return {name: stats[:, :, SLOTS[name]] for name in names}
