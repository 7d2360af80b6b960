"""The shared CUDA kernels (csrc/kernels/*.cuh) compiled with NVRTC through ``cupy.RawModule``.

The kernel text is never copied into Python: the module's source is two ``#include`` lines and
the include path points at the installed ``segloss_csrc`` package, so the CuPy and the PyTorch
backends run the same kernels. CuPy caches compiled modules on disk keyed by the source text
and options; the options carry a hash of every header (``-DSEGLOSS_SOURCE_HASH=…``), so an
edited header recompiles. Template instantiations are requested through name expressions
(``segloss::region_stats_partials_kernel<float, long long, float, true>``) and a module is
memoised per device and per set of instantiations.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import segloss_csrc

SOURCE = '#include "kernels/region_stats_device.cuh"\n#include "kernels/edt_device.cuh"\n'

DTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
LABEL_TYPES = {"int64": "long long", "int32": "int", "uint8": "unsigned char"}


@lru_cache(maxsize=1)
def source_hash() -> str:
    root = segloss_csrc.source_dir()
    digest = hashlib.sha256()
    for path in sorted((root / "kernels").glob("*.cuh")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def include_dir() -> Path:
    return segloss_csrc.source_dir()


def nvrtc_options() -> tuple[str, ...]:
    return ("-std=c++17", f"-I{include_dir()}", f"-DSEGLOSS_SOURCE_HASH={source_hash()}")


def accumulation(dtype: str) -> str:
    return "double" if dtype == "float64" else "float"


def region_names(dtype: str, label_type: str | None) -> dict[str, str]:
    """Name expressions of the region-statistics kernels for one input dtype and label type."""
    t = DTYPES[dtype]
    a = accumulation(dtype)
    labels = "true" if label_type is not None else "false"
    lt = LABEL_TYPES[label_type or "int64"]
    return {
        "partials": f"segloss::region_stats_partials_kernel<{t}, {lt}, {a}, {labels}>",
        "finish": f"segloss::region_stats_finish_kernel<{a}>",
        "backward": f"segloss::region_stats_backward_kernel<{t}, {lt}, {a}, {labels}>",
    }


def edt_names(label_type: str) -> dict[str, str]:
    lt = LABEL_TYPES[label_type]
    return {
        "count": f"segloss::edt_count_kernel<{lt}>",
        "count_mask": "segloss::edt_count_kernel<unsigned char>",
        "first": f"segloss::edt_first_pass_kernel<{lt}>",
        "first_mask": "segloss::edt_first_pass_kernel<unsigned char>",
        "parabola": f"segloss::edt_parabola_kernel<{lt}>",
        "parabola_mask": "segloss::edt_parabola_kernel<unsigned char>",
        "compose": f"segloss::edt_compose_labels_kernel<{lt}>",
        "compose_mask": "segloss::edt_compose_masks_kernel",
    }


def _module_impl(names: tuple[str, ...]) -> Any:
    import cupy

    return cupy.RawModule(code=SOURCE, options=nvrtc_options(), name_expressions=list(names))


_MEMOISED: dict[Any, Any] = {}


def functions(names: dict[str, str]) -> dict[str, Any]:
    """{key: RawKernel} for the name expressions, compiled once per device."""
    import cupy

    expressions = tuple(sorted(set(names.values())))
    key = (cupy.cuda.Device().id, expressions)
    module = _MEMOISED.get(key)
    if module is None:
        module = _module_impl(expressions)
        _MEMOISED[key] = module
    return {k: module.get_function(v) for k, v in names.items()}
