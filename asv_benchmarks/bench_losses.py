"""Losses: segloss (fused, native) and its peers (MONAI, nnU-Net) on the same inputs, in one grid.

Every workload is the loss alone on (logits, labels) from ``common.loss_inputs``: ``time_*``
forward + backward (one training step: a fresh gradient each call) and forward only (no
autograd); ``peakmem_*`` the process's peak RSS during one step; ``track_extra_peak`` the
step's peak memory above what was in use before it, as a multiple of the logits' size (1.0 is
the gradient itself, the least any loss can allocate).

Select with ``--bench``: ``LossTime``, ``LossMemory``, ``LossDtype``, ``CPU``, ``CUDA``, or one
combination, e.g. ``--bench "LossTimeCPU.time_forward_backward\\('dice', 'segloss-fused'"``.
"""

from __future__ import annotations

import gc
from typing import ClassVar

import torch

from .common import (
    DTYPES,
    IMPLEMENTATIONS,
    IMPLEMENTATIONS_CUDA,
    LOSSES,
    SHAPES,
    Benchmark,
    check_combination,
    exact_rss_accounting,
    extra_peak_bytes,
    forward,
    loss_inputs,
    make_loss,
    parse_shape,
    require_fused,
    reset_peak_rss,
    skip_if_no_cuda,
    step,
    synchronize,
)


class _LossCase(Benchmark):
    """Inputs and the loss for one (loss, implementation, shape, dtype); setup only, no benchmark."""

    device = "cpu"
    warm_up = False  # one call on a small input first: threads, lazy initialisation, code pages

    def prepare(self, cache, loss: str, implementation: str, shape: str, dtype: str = "float32") -> None:
        if self.device == "cuda":
            skip_if_no_cuda()
        if implementation == "segloss-fused":
            require_fused(cache)
        dims = parse_shape(shape)
        check_combination(loss, implementation, dims)
        key = (loss, implementation, shape, dtype)
        if getattr(self, "_key", None) != key:  # asv re-runs setup before every sample: keep the inputs
            self.logits, self.labels = loss_inputs(dims, self.device, dtype)
            self.loss = make_loss(loss, implementation, dims, self.labels)
            self.logit_bytes = self.logits.numel() * self.logits.element_size()
            self._key = key
            if self.warm_up:
                small = (dims[0], dims[1]) + (8,) * (len(dims) - 2)
                logits, labels = loss_inputs(small, self.device, dtype)
                step(make_loss(loss, implementation, small, labels), logits, labels)
        synchronize(self.device)

    def run_step(self) -> None:
        step(self.loss, self.logits, self.labels)
        synchronize(self.device)

    def run_forward(self) -> None:
        forward(self.loss, self.logits, self.labels)
        synchronize(self.device)


class LossTimeCPU(_LossCase):
    """Seconds per call, forward + backward and forward only."""

    version = "1"  # bump when the workload (inputs, loss configuration, what is timed) changes
    params: ClassVar[list] = [LOSSES, IMPLEMENTATIONS, SHAPES]
    param_names: ClassVar[list] = ["loss", "implementation", "shape"]

    def setup(self, cache, loss, implementation, shape):
        self.prepare(cache, loss, implementation, shape)

    def time_forward_backward(self, cache, loss, implementation, shape):
        self.run_step()

    def time_forward(self, cache, loss, implementation, shape):
        self.run_forward()


class LossTimeCUDA(LossTimeCPU):
    """As LossTimeCPU on the GPU (synchronised before the clock stops), with the CuPy backend as a
    fifth implementation; skipped without CUDA."""

    version = "1"
    device = "cuda"
    params: ClassVar[list] = [LOSSES, IMPLEMENTATIONS_CUDA, SHAPES]


class LossMemoryCPU(_LossCase):
    """Memory of one step: the process's peak RSS (peakmem_) and the extra peak × logits (track_)."""

    version = "1"
    params: ClassVar[list] = [LOSSES, IMPLEMENTATIONS, SHAPES]
    param_names: ClassVar[list] = ["loss", "implementation", "shape"]
    warm_up = True

    def setup(self, cache, loss, implementation, shape):
        exact_rss_accounting()  # before the inputs: every large block mapped, freed ones unmapped
        self.prepare(cache, loss, implementation, shape)
        gc.collect()
        reset_peak_rss()  # peakmem_: the peak during the step (interpreter + inputs + the step's own)

    def peakmem_forward_backward(self, cache, loss, implementation, shape):
        self.run_step()

    def track_extra_peak(self, cache, loss, implementation, shape):
        return round(extra_peak_bytes(self.run_step, self.device) / self.logit_bytes, 3)

    track_extra_peak.unit = "x logits"


class LossMemoryCUDA(_LossCase):
    """GPU memory of one step (torch.cuda.max_memory_allocated): the extra peak × logits, and the
    absolute peak of the step (inputs included) in bytes; skipped without CUDA."""

    version = "1"
    device = "cuda"
    params: ClassVar[list] = [LOSSES, IMPLEMENTATIONS_CUDA, SHAPES]
    param_names: ClassVar[list] = ["loss", "implementation", "shape"]
    warm_up = True

    def setup(self, cache, loss, implementation, shape):
        self.prepare(cache, loss, implementation, shape)

    def track_extra_peak(self, cache, loss, implementation, shape):
        return round(extra_peak_bytes(self.run_step, self.device) / self.logit_bytes, 3)

    track_extra_peak.unit = "x logits"

    def track_peak_bytes(self, cache, loss, implementation, shape):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.run_step()
        return float(torch.cuda.max_memory_allocated())

    track_peak_bytes.unit = "bytes"


class LossDtypeCPU(_LossCase):
    """Logits in float32, bfloat16, float16, float64 (labels int64), 1×4×128³: seconds per step and
    the extra peak × the logits' size in that dtype."""

    version = "1"
    params: ClassVar[list] = [["dice", "dice_ce"], IMPLEMENTATIONS, DTYPES]
    param_names: ClassVar[list] = ["loss", "implementation", "dtype"]
    shape = "1x4x128x128x128"
    warm_up = True

    def setup(self, cache, loss, implementation, dtype):
        self.prepare(cache, loss, implementation, self.shape, dtype)

    def time_forward_backward(self, cache, loss, implementation, dtype):
        self.run_step()

    def track_extra_peak(self, cache, loss, implementation, dtype):
        return round(extra_peak_bytes(self.run_step, self.device) / self.logit_bytes, 3)

    track_extra_peak.unit = "x logits"


class LossDtypeCUDA(LossDtypeCPU):
    """As LossDtypeCPU on the GPU (and the CuPy backend); skipped without CUDA."""

    version = "1"
    device = "cuda"
    params: ClassVar[list] = [["dice", "dice_ce"], IMPLEMENTATIONS_CUDA, DTYPES]
