"""The fused CUDA kernels without nvcc: the ``csrc/kernels`` sources compiled at run time by NVRTC.

pip-installed PyTorch ships no nvcc, so on most GPU machines the nvcc-built CUDA library cannot
be built. Then (or always, with ``SEGLOSS_CUDA_KERNELS=nvrtc``) the same kernel text is compiled
by the shared loader :mod:`segloss_csrc.nvrtc` (the CuPy backend's too) for the GPU's exact
architecture, and launched with NVIDIA's ``cuda.core`` on torch's current stream. The launchers
below follow ``csrc/cuda/region_stats.cu`` and ``csrc/cuda/edt.cu`` step by step (same grids,
blocks and scratch). They are registered as the CUDA kernels of the very ``torch.ops.segloss``
ops the nvcc library implements, so fake kernels, autograd, ``torch.compile`` and DDP are the
same on both paths.

A launcher talks to the GPU only through a :class:`Runner` (compile a set of name expressions,
launch one with named arguments): the tests run every launcher with a recording runner on CPU
tensors to check each launch's arguments against the kernels' declared signatures, and compile
every instantiation the launchers request with NVRTC, all without a GPU.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from segloss_core.statistics import FUSED_INVALID_SLOT, FUSED_NUM_SLOTS
from segloss_csrc import nvrtc

LAUNCH = nvrtc.LAUNCH
LABEL_TYPES = {torch.int64: "int64", torch.int32: "int32", torch.uint8: "uint8"}
DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}


class Runner(Protocol):
    def kernels(self, device: torch.device, names: dict[str, str]) -> dict[str, Any]: ...

    def launch(
        self, device: torch.device, kernel: Any, name: str, grid: tuple[int, ...], block: int, shared: int, values: dict
    ) -> None: ...


class CudaCoreRunner:
    """Compiles with :func:`segloss_csrc.nvrtc.compile_module`, launches with ``cuda.core`` on the
    current torch stream of the tensors' device."""

    def __init__(self) -> None:
        self._modules: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._lock = threading.Lock()

    def kernels(self, device: torch.device, names: dict[str, str]) -> dict[str, Any]:
        from cuda.core import Device, ObjectCode

        index = device.index if device.index is not None else torch.cuda.current_device()
        expressions = tuple(sorted(set(names.values())))
        Device(index).set_current()
        with self._lock:
            module = self._modules.get((index, expressions))
            if module is None:
                compiled = nvrtc.compile_module(expressions, nvrtc.arch_of(torch.cuda.get_device_capability(index)))
                module = ObjectCode.from_cubin(compiled.cubin, symbol_mapping=compiled.lowered)
                self._modules[(index, expressions)] = module
        return {key: module.get_kernel(name) for key, name in names.items()}

    def launch(
        self, device: torch.device, kernel: Any, name: str, grid: tuple[int, ...], block: int, shared: int, values: dict
    ) -> None:
        from cuda.core import Device, LaunchConfig, launch

        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda_device = Device(index)
        cuda_device.set_current()  # per thread: autograd runs backward in its own thread
        stream = cuda_device.create_stream(torch.cuda.current_stream(index))
        config = LaunchConfig(grid=grid, block=(block,), shmem_size=shared)
        launch(stream, config, kernel, *nvrtc.pack(name, values))


_RUNNER: Runner = CudaCoreRunner()


def unavailable_reason() -> str | None:
    """None if the NVRTC path can serve this machine's GPUs, else why not."""
    return nvrtc.unavailable_reason()


def register() -> None:
    """Make these launchers the CUDA kernels of the ``torch.ops.segloss`` ops."""
    torch.library.register_kernel("segloss::region_stats", "cuda", region_stats)
    torch.library.register_kernel("segloss::region_stats_backward", "cuda", region_stats_backward)
    torch.library.register_kernel("segloss::label_distance_maps", "cuda", label_distance_maps)
    torch.library.register_kernel("segloss::mask_distance_maps", "cuda", mask_distance_maps)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _grid_for(work: int, block: int) -> int:
    return max(1, min(_ceil(work, block), 65535))


# ---------------------------------------------------------------------------------------------
# region statistics (csrc/cuda/region_stats.cu)


def _canonical(logits, labels, target, mask, activation, regions=None):
    """The layout of csrc/torch/common.cpp canonical_inputs: (B, C, N) logits, (B, N) labels,
    (B, C, N) target in the logits' dtype, (Mb, N) mask in the accumulation dtype, (L + 1,) int64
    region membership table."""
    if not (3 <= logits.dim() <= 5) or not logits.is_floating_point():
        raise RuntimeError(
            f"segloss::region_stats: logits must be floating (B, C, *spatial), got {tuple(logits.shape)}"
        )
    if activation not in (0, 1, 2):
        raise RuntimeError("segloss::region_stats: activation must be 0, 1 or 2")
    if (labels is None) == (target is None):
        raise RuntimeError("segloss::region_stats: give exactly one of labels, target")
    batch, channels = int(logits.shape[0]), int(logits.shape[1])
    voxels = 0 if batch == 0 or channels == 0 else logits.numel() // (batch * channels)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.contiguous().view(batch, channels, voxels)
    if labels is not None:
        if labels.numel() != batch * voxels or labels.is_floating_point():
            raise RuntimeError(f"segloss::region_stats: labels must be integer with B*N = {batch * voxels} elements")
        if labels.dtype not in LABEL_TYPES:
            labels = labels.to(torch.int64)
        labels = labels.contiguous().view(batch, voxels)
    else:
        if target.shape != logits.shape:
            raise RuntimeError(f"segloss::region_stats: target {tuple(target.shape)} must match {tuple(logits.shape)}")
        target = target.to(logits.dtype).contiguous().view(batch, channels, voxels)
    mask_stride = 0
    if mask is not None:
        rows = int(mask.shape[0]) if mask.dim() > 0 else 1
        if rows not in (1, batch) or mask.numel() != rows * voxels:
            raise RuntimeError(f"segloss::region_stats: mask must be (B or 1, 1, *spatial), got {tuple(mask.shape)}")
        mask = mask.to(acc).contiguous().view(rows, voxels)
        mask_stride = voxels if rows > 1 else 0
    if regions is not None:
        if labels is None:
            raise RuntimeError("segloss::region_stats: regions need integer labels")
        if regions.dtype != torch.int64 or regions.dim() != 1 or regions.numel() < 1 or channels > 64:
            raise RuntimeError("segloss::region_stats: regions must be a non-empty 1-D int64 membership table")
        regions = regions.to(z.device).contiguous()
    return z, labels, target, mask, mask_stride, batch, channels, voxels, acc, regions


def _fields(field_pred, field_sq_err, z, acc):
    """The fields as add_fields in csrc/torch/common.cpp: (B, C, N) contiguous in the accumulation dtype."""
    out = []
    for name, field in (("field_pred", field_pred), ("field_sq_err", field_sq_err)):
        if field is not None and field.numel() != z.numel():
            raise RuntimeError(f"segloss::region_stats: {name} must have the logits' shape, got {tuple(field.shape)}")
        out.append(None if field is None else field.to(acc).contiguous().view(z.shape))
    return out


def _region_values(
    z, labels, target, mask, mask_stride, batch, channels, voxels, activation, ignore, has, ce_neg, regions, fields
):
    return {
        "regions": _ptr(regions),
        "region_labels": 0 if regions is None else int(regions.numel()),
        "logits": _ptr(z),
        "labels": _ptr(labels),
        "target": _ptr(target),
        "mask": _ptr(mask),
        "mask_batch_stride": mask_stride,
        "batch": batch,
        "channels": channels,
        "voxels": voxels,
        "activation": activation,
        "ignore_index": ignore,
        "has_ignore": int(has),
        "want_ce_neg": int(ce_neg),
        "field_pred": _ptr(fields[0]),
        "field_sq_err": _ptr(fields[1]),
    }


def _region_names(z: torch.Tensor, labels: torch.Tensor | None) -> dict[str, str]:
    return nvrtc.region_names(DTYPES[z.dtype], None if labels is None else LABEL_TYPES[labels.dtype])


def region_stats(logits, labels, target, mask, activation, ignore_index, has_ignore, want_ce_neg, check_labels,
                 regions=None, field_pred=None, field_sq_err=None):  # fmt: skip
    z, labels, target, mask, stride, batch, channels, voxels, acc, regions = _canonical(
        logits, labels, target, mask, activation, regions
    )
    fields = _fields(field_pred, field_sq_err, z, acc)
    out = torch.zeros((batch, channels, FUSED_NUM_SLOTS), dtype=acc, device=logits.device)
    if batch == 0 or voxels == 0:
        return out
    chunks = max(1, _ceil(voxels, LAUNCH["chunk"]))
    groups = _ceil(channels, LAUNCH["group"])
    if batch > 65535 or chunks * groups > 2147483647:
        raise RuntimeError("segloss::region_stats (CUDA, NVRTC) failed: invalid configuration argument")
    partials = torch.empty(batch * groups * chunks * LAUNCH["group"] * FUSED_NUM_SLOTS, dtype=acc, device=z.device)
    names = _region_names(z, labels)
    fns = _RUNNER.kernels(z.device, names)
    values = _region_values(
        z, labels, target, mask, stride, batch, channels, voxels, activation, ignore_index, has_ignore, want_ce_neg,
        regions,
        fields,
    )  # fmt: skip
    _RUNNER.launch(
        z.device,
        fns["partials"],
        names["partials"],
        (chunks * groups, 1, batch),  # the class group fastest, as csrc/cuda/region_stats.cu
        LAUNCH["block"],
        0,
        {**values, "partials": _ptr(partials)},
    )
    outputs = batch * channels * FUSED_NUM_SLOTS
    _RUNNER.launch(
        z.device,
        fns["finish"],
        names["finish"],
        (_ceil(outputs, 256), 1, 1),
        256,
        0,
        {"partials": _ptr(partials), "batch": batch, "channels": channels, "groups": groups, "chunks": chunks,
         "out": _ptr(out)},
    )  # fmt: skip
    if check_labels and labels is not None:
        valid_max = (
            int(regions.numel()) if regions is not None else (2 if channels == 1 and activation != 0 else channels)
        )
        _check_invalid_labels(out, labels, valid_max, has_ignore, ignore_index)
    return out


def _check_invalid_labels(stats, labels, valid_max, has_ignore, ignore_index) -> None:
    """As csrc/torch/common.cpp check_invalid_labels: name the offending values and their count."""
    invalid = float(stats[:, 0, FUSED_INVALID_SLOT].sum())
    if invalid <= 0:
        return
    values = labels.to(torch.int64)
    bad = (values < 0) | (values >= valid_max)
    if has_ignore:
        bad &= values != ignore_index
    offending = torch.unique(values[bad].cpu()).tolist()
    shown = ", ".join(str(v) for v in offending[:5]) + (", ..." if len(offending) > 5 else "")
    extra = f" or ignore_index={ignore_index}" if has_ignore else ""
    raise RuntimeError(f"target has labels outside [0, {valid_max}){extra}: {shown} ({int(invalid)} voxel(s))")


def region_stats_backward(grad, logits, labels, target, mask, activation, ignore_index, has_ignore, regions=None,
                          field_pred=None, field_sq_err=None):  # fmt: skip
    z, labels, target, mask, stride, batch, channels, voxels, acc, regions = _canonical(
        logits, labels, target, mask, activation, regions
    )
    fields = _fields(field_pred, field_sq_err, z, acc)
    if tuple(grad.shape) != (batch, channels, FUSED_NUM_SLOTS):
        raise RuntimeError(
            f"segloss::region_stats_backward: grad must be (B, C, {FUSED_NUM_SLOTS}), got {tuple(grad.shape)}"
        )
    upstream = grad.to(acc).contiguous()
    result = torch.empty_like(z, memory_format=torch.contiguous_format)
    if batch == 0 or channels == 0 or voxels == 0:
        return result.view(logits.shape)
    names = _region_names(z, labels)
    fns = _RUNNER.kernels(z.device, {"backward": names["backward"]})
    blocks = max(1, min(_ceil(batch * voxels, LAUNCH["block"]), LAUNCH["max_backward_blocks"]))
    values = _region_values(
        z,
        labels,
        target,
        mask,
        stride,
        batch,
        channels,
        voxels,
        activation,
        ignore_index,
        has_ignore,
        True,
        regions,
        fields,
    )
    _RUNNER.launch(
        z.device,
        fns["backward"],
        names["backward"],
        (blocks, 1, 1),
        LAUNCH["block"],
        0,
        {**values, "upstream": _ptr(upstream), "grad": _ptr(result)},
    )
    return result.view(logits.shape)


# ---------------------------------------------------------------------------------------------
# distance maps (csrc/cuda/edt.cu)


def _geometry(spatial: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    if not 1 <= len(spatial) <= 3:
        raise RuntimeError(f"segloss distance maps: 1 to 3 spatial dims, got {len(spatial)}")
    if len(spacing) != len(spatial):
        raise RuntimeError(f"segloss distance maps: spacing has {len(spacing)} values for {len(spatial)} spatial dims")
    for s in spacing:
        if not s > 0:
            raise RuntimeError(f"segloss distance maps: spacing must be positive, got {s}")
    return tuple(int(s) for s in spatial), tuple(float(s) for s in spacing)


def _transform(fns, names, suffix, labels, out, volumes, label_div, multilabel, mask_mode, sizes, spacing) -> None:
    voxels = math.prod(sizes)
    last = len(sizes) - 1
    n_last = sizes[last]
    device = out.device
    first, parabola = "first" + suffix, "parabola" + suffix
    _RUNNER.launch(
        device,
        fns[first],
        names[first],
        (_grid_for(volumes * (voxels // n_last), LAUNCH["edt_block"]), 1, 1),
        LAUNCH["edt_block"],
        0,
        {"labels": _ptr(labels), "out": _ptr(out), "volumes": volumes, "voxels": voxels, "n": n_last,
         "label_div": label_div, "multilabel": multilabel, "mask_mode": mask_mode, "spacing": spacing[last]},
    )  # fmt: skip
    if last == 0:
        return
    n_max, threads_max = max(sizes), LAUNCH["edt_max_threads"]
    v = torch.empty(threads_max * (n_max + 2), dtype=torch.int32, device=device)
    z = torch.empty(threads_max * (n_max + 3), dtype=torch.float64, device=device)
    fk = torch.empty(threads_max * (n_max + 2), dtype=torch.float64, device=device)
    g = torch.empty(threads_max * (n_max + 2), dtype=torch.float32, device=device)
    for axis in range(last - 1, -1, -1):
        stride = math.prod(sizes[axis + 1 :])
        lines = volumes * (voxels // sizes[axis])
        _RUNNER.launch(
            device,
            fns[parabola],
            names[parabola],
            (_grid_for(min(lines, threads_max), LAUNCH["edt_block"]), 1, 1),
            LAUNCH["edt_block"],
            0,
            {"labels": _ptr(labels), "out": _ptr(out), "volumes": volumes, "voxels": voxels, "n": sizes[axis],
             "stride": stride, "label_div": label_div, "multilabel": multilabel, "mask_mode": mask_mode,
             "spacing": spacing[axis], "v_scratch": _ptr(v), "z_scratch": _ptr(z), "f_scratch": _ptr(fk),
             "g_scratch": _ptr(g)},
        )  # fmt: skip


def label_distance_maps(labels, num_classes, spacing, kind, no_boundary_value, ignore_index, has_ignore):
    if not 2 <= labels.dim() <= 4:
        raise RuntimeError("segloss::label_distance_maps: labels must be (B, *spatial)")
    if labels.dtype not in LABEL_TYPES:
        labels = labels.to(torch.int64)
    labels = labels.contiguous()
    batch, classes = int(labels.shape[0]), int(num_classes)
    sizes, sampling = _geometry(labels.shape[1:], spacing)
    voxels = math.prod(sizes)
    out = torch.empty((batch, classes, *sizes), dtype=torch.float32, device=labels.device)
    if batch == 0 or classes == 0 or voxels == 0:
        return out
    if batch > 65535:
        raise RuntimeError("segloss distance maps (CUDA, NVRTC) failed: invalid configuration argument")
    names = nvrtc.edt_names(LABEL_TYPES[labels.dtype])
    names = {k: names[k] for k in ("count", "first", "parabola", "compose")}
    fns = _RUNNER.kernels(labels.device, names)
    counts = torch.zeros(batch * classes, dtype=torch.int64, device=labels.device)  # read as unsigned long long
    _RUNNER.launch(
        labels.device,
        fns["count"],
        names["count"],
        (_grid_for(voxels, 256), batch, 1),
        256,
        8 * classes,
        {"labels": _ptr(labels), "volumes": batch, "voxels": voxels, "classes": classes,
         "ignore_index": ignore_index, "has_ignore": has_ignore, "counts": _ptr(counts)},
    )  # fmt: skip
    din = torch.empty(batch * voxels, dtype=torch.float32, device=labels.device)
    _transform(fns, names, "", labels, din, batch, 1, True, False, sizes, sampling)
    _transform(fns, names, "", labels, out, batch * classes, classes, False, False, sizes, sampling)
    _RUNNER.launch(
        labels.device,
        fns["compose"],
        names["compose"],
        (_grid_for(batch * classes * voxels, 256), 1, 1),
        256,
        0,
        {"labels": _ptr(labels), "din": _ptr(din), "out": _ptr(out), "batch": batch, "classes": classes,
         "voxels": voxels, "counts": _ptr(counts), "kind": kind, "no_boundary": no_boundary_value},
    )  # fmt: skip
    return out


def mask_distance_maps(masks, spacing, kind, no_boundary_value):
    if not 3 <= masks.dim() <= 5:
        raise RuntimeError("segloss::mask_distance_maps: masks must be (B, C, *spatial)")
    m = masks.to(torch.uint8).contiguous()
    volumes = int(m.shape[0]) * int(m.shape[1])
    sizes, sampling = _geometry(m.shape[2:], spacing)
    voxels = math.prod(sizes)
    out = torch.empty(m.shape, dtype=torch.float32, device=m.device)
    if volumes == 0 or voxels == 0:
        return out
    if volumes > 65535:
        raise RuntimeError("segloss distance maps (CUDA, NVRTC) failed: invalid configuration argument")
    every = nvrtc.edt_names("uint8")
    names = {"count": every["count_mask"], "first": every["first_mask"], "parabola": every["parabola_mask"],
             "compose": every["compose_mask"]}  # fmt: skip
    fns = _RUNNER.kernels(m.device, names)
    counts = torch.zeros(volumes, dtype=torch.int64, device=m.device)
    _RUNNER.launch(
        m.device,
        fns["count"],
        names["count"],
        (_grid_for(voxels, 256), volumes, 1),
        256,
        8,
        {"labels": _ptr(m), "volumes": volumes, "voxels": voxels, "classes": 1, "ignore_index": 0,
         "has_ignore": False, "counts": _ptr(counts)},
    )  # fmt: skip
    # a 0/1 mask is a two-label map: the distance to the other label is d_in inside, d_out outside
    _transform(fns, names, "", m, out, volumes, 1, True, True, sizes, sampling)
    _RUNNER.launch(
        m.device,
        fns["compose"],
        names["compose"],
        (_grid_for(volumes * voxels, 256), 1, 1),
        256,
        0,
        {"masks": _ptr(m), "out": _ptr(out), "volumes": volumes, "voxels": voxels, "counts": _ptr(counts),
         "kind": kind, "no_boundary": no_boundary_value},
    )  # fmt: skip
    return out
