"""The shared CUDA kernels (csrc/kernels/*_device.cuh) for CuPy, from the one NVRTC loader.

:mod:`segloss_csrc.nvrtc` compiles the kernels (the same loader the PyTorch backend uses where
nvcc is absent) for the current device's architecture and caches the cubin on disk; this module
loads it with ``cupy.RawModule(path=...)`` and fetches each instantiation by its lowered name.
Modules are memoised per device and per set of instantiations.
"""

from __future__ import annotations

from typing import Any

from segloss_csrc import nvrtc

SOURCE = nvrtc.SOURCE
DTYPES = nvrtc.DTYPES
LABEL_TYPES = nvrtc.LABEL_TYPES
LAUNCH = nvrtc.LAUNCH
region_names = nvrtc.region_names
edt_names = nvrtc.edt_names
source_hash = nvrtc.source_hash

_MEMOISED: dict[Any, tuple[Any, dict[str, str]]] = {}


def _arch(device: Any) -> str:
    capability = str(device.compute_capability)  # "90" for sm_90
    return nvrtc.arch_of((int(capability[:-1]), int(capability[-1])))


def functions(names: dict[str, str]) -> dict[str, Any]:
    """{key: RawKernel} for the name expressions, compiled once per device (cached on disk)."""
    import cupy

    device = cupy.cuda.Device()
    expressions = tuple(sorted(set(names.values())))
    key = (device.id, expressions)
    entry = _MEMOISED.get(key)
    if entry is None:
        compiled = nvrtc.compile_module(expressions, _arch(device))
        entry = (cupy.RawModule(path=str(compiled.path)), compiled.lowered)
        _MEMOISED[key] = entry
    module, lowered = entry
    return {k: module.get_function(lowered[v]) for k, v in names.items()}
