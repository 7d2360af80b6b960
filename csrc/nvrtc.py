"""The one NVRTC loader of the shared CUDA kernels (``csrc/kernels/*_device.cuh``), for every backend.

The PyTorch backend (without nvcc) and the CuPy backend both get their kernels here: the module's
source is two ``#include`` lines (the kernel text is never copied into Python), compiled with
NVIDIA's ``cuda.core`` (pip ``cuda-core`` + ``cuda-bindings``; NVRTC itself comes with PyTorch's
CUDA wheels or ``nvidia-cuda-nvrtc``) for one GPU architecture and a set of template
instantiations requested by name expression
(``segloss::region_stats_partials_kernel<float, long long, float, true>``). The cubin and its
lowered (mangled) names are cached on disk under ``<build dir>/nvrtc/``, keyed by a hash of every
kernel header, the name expressions, the architecture, the options and NVRTC's version, and
written atomically (a temporary file, then a rename). Compiling needs no GPU.

``SIGNATURES`` declares each kernel's parameters (name and kind); launchers pack their arguments
with :func:`pack`, and the tests check the table against the kernels' source text.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import source_dir

SOURCE = '#include "kernels/region_stats_device.cuh"\n#include "kernels/edt_device.cuh"\n'

DTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
LABEL_TYPES = {"int64": "long long", "int32": "int", "uint8": "unsigned char"}

# launch geometry of csrc/cuda/*.cu (kBlock, kGroup, kChunkVoxels, kEdtBlock, kMaxThreads,
# RegionStatsArgs::max_backward_blocks), for the launchers that run without nvcc; tested against the sources
LAUNCH = {
    "block": 256,
    "group": 8,
    "chunk": 4096,
    "edt_block": 128,
    "edt_max_threads": 8192,
    "max_backward_blocks": 1 << 20,
}

# parameter kinds: C type, numpy scalar type name used to pack it
KINDS = {
    "ptr": ("pointer", "uint64"),
    "i64": ("int64_t", "int64"),
    "i32": ("int", "int32"),
    "bool": ("bool", "bool_"),
    "f64": ("double", "float64"),
    "f32": ("float", "float32"),
}

_REGION = (
    ("mask", "ptr"),
    ("mask_batch_stride", "i64"),
    ("batch", "i64"),
    ("channels", "i64"),
    ("voxels", "i64"),
    ("activation", "i32"),
    ("ignore_index", "i64"),
    ("has_ignore", "i32"),
    ("want_ce_neg", "i32"),
    ("regions", "ptr"),
    ("region_labels", "i64"),
    ("field_pred", "ptr"),
    ("field_sq_err", "ptr"),
)
_DATA = (("logits", "ptr"), ("labels", "ptr"), ("target", "ptr"))

# kernel (without template arguments) -> ((parameter, kind), ...), in declaration order
SIGNATURES: dict[str, tuple[tuple[str, str], ...]] = {
    "region_stats_partials_kernel": (*_DATA, *_REGION, ("partials", "ptr")),
    "region_stats_finish_kernel": (
        ("partials", "ptr"),
        ("batch", "i64"),
        ("channels", "i64"),
        ("groups", "i64"),
        ("chunks", "i64"),
        ("out", "ptr"),
    ),
    "region_stats_backward_kernel": (*_DATA, *_REGION, ("upstream", "ptr"), ("grad", "ptr")),
    "edt_count_kernel": (
        ("labels", "ptr"),
        ("volumes", "i64"),
        ("voxels", "i64"),
        ("classes", "i64"),
        ("ignore_index", "i64"),
        ("has_ignore", "bool"),
        ("counts", "ptr"),
    ),
    "edt_first_pass_kernel": (
        ("labels", "ptr"),
        ("out", "ptr"),
        ("volumes", "i64"),
        ("voxels", "i64"),
        ("n", "i32"),
        ("label_div", "i64"),
        ("multilabel", "bool"),
        ("mask_mode", "bool"),
        ("spacing", "f64"),
    ),
    "edt_parabola_kernel": (
        ("labels", "ptr"),
        ("out", "ptr"),
        ("volumes", "i64"),
        ("voxels", "i64"),
        ("n", "i32"),
        ("stride", "i64"),
        ("label_div", "i64"),
        ("multilabel", "bool"),
        ("mask_mode", "bool"),
        ("spacing", "f64"),
        ("v_scratch", "ptr"),
        ("z_scratch", "ptr"),
        ("f_scratch", "ptr"),
        ("g_scratch", "ptr"),
    ),
    "edt_compose_labels_kernel": (
        ("labels", "ptr"),
        ("din", "ptr"),
        ("out", "ptr"),
        ("batch", "i64"),
        ("classes", "i64"),
        ("voxels", "i64"),
        ("counts", "ptr"),
        ("kind", "i32"),
        ("no_boundary", "f32"),
    ),
    "edt_compose_masks_kernel": (
        ("masks", "ptr"),
        ("out", "ptr"),
        ("volumes", "i64"),
        ("voxels", "i64"),
        ("counts", "ptr"),
        ("kind", "i32"),
        ("no_boundary", "f32"),
    ),
}


class NvrtcError(RuntimeError):
    """NVRTC is missing or rejected the kernels (the message holds its log)."""


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


def all_kernel_names(dtypes: tuple[str, ...] = tuple(DTYPES)) -> list[str]:
    """Every instantiation a launcher can request (region statistics for ``dtypes``, all EDT kernels)."""
    names: set[str] = set()
    for dtype in dtypes:
        for label_type in (None, *LABEL_TYPES):
            names.update(region_names(dtype, label_type).values())
    for label_type in LABEL_TYPES:
        names.update(edt_names(label_type).values())
    return sorted(names)


def kernel_of(name_expression: str) -> str:
    """``segloss::edt_count_kernel<int>`` -> ``edt_count_kernel`` (the key of ``SIGNATURES``)."""
    return name_expression.split("<", 1)[0].rsplit("::", 1)[-1]


def pack(name_expression: str, values: dict[str, Any]) -> tuple[Any, ...]:
    """Kernel arguments in declaration order, each as the numpy scalar of its declared kind.

    ``values`` maps parameter names to Python values; pointers are device addresses (int, 0 for
    null). Raises ``TypeError`` naming a missing or unexpected parameter.
    """
    import numpy as np

    signature = SIGNATURES[kernel_of(name_expression)]
    names = [n for n, _ in signature]
    if set(values) != set(names):
        missing, unexpected = sorted(set(names) - set(values)), sorted(set(values) - set(names))
        raise TypeError(f"{name_expression}: missing {missing}, unexpected {unexpected}")
    return tuple(getattr(np, KINDS[kind][1])(values[n]) for n, kind in signature)


# ---------------------------------------------------------------------------------------------
# compilation


@lru_cache(maxsize=1)
def source_hash() -> str:
    """Hash of every kernel header (the NVRTC module includes them all)."""
    digest = hashlib.sha256()
    for path in sorted((source_dir() / "kernels").glob("*.cuh")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    """The build cache of every backend: ``$SEGLOSS_BUILD_DIR``, ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/segloss``."""
    base = os.environ.get("SEGLOSS_BUILD_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(base) if base else Path.home() / ".cache" / "segloss"


def cuda_include_dirs() -> list[str]:
    """Directories with the CUDA headers the kernels include (cuda_fp16.h, cuda_bf16.h): the
    nvidia-* wheels first, then CUDA_HOME / CUDA_PATH / /usr/local/cuda."""
    dirs: list[str] = []
    try:
        import nvidia

        for root in getattr(nvidia, "__path__", []):
            dirs += sorted(str(p) for p in Path(root).glob("*/include") if (p / "cuda_fp16.h").exists())
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_fp16.h").exists():
            dirs.append(str(Path(home) / "include"))
    return list(dict.fromkeys(dirs))


def include_dirs() -> list[str]:
    return [str(source_dir()), *cuda_include_dirs()]


def nvrtc_version() -> str:
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise NvrtcError(f"nvrtcVersion failed: {err}")
    return f"{major}.{minor}"


def unavailable_reason() -> str | None:
    """None if kernels can be compiled here, else why not (one line)."""
    try:
        import cuda.core  # noqa: F401
    except ImportError as exc:
        return f"cuda.core is not installed ({exc}); pip install cuda-core cuda-bindings"
    try:
        nvrtc_version()
    except Exception as exc:  # noqa: BLE001 - the library is missing or does not load
        return f"NVRTC is not usable ({type(exc).__name__}: {exc}); pip install nvidia-cuda-nvrtc"
    if not cuda_include_dirs():
        return "the CUDA headers (cuda_fp16.h) were not found; pip install nvidia-cuda-runtime or set CUDA_HOME"
    return None


def options_text(arch: str) -> list[str]:
    return ["-std=c++17", f"--gpu-architecture={arch}", "--use_fast_math=false"]


@dataclass(frozen=True)
class Compiled:
    """A compiled module: the cubin's path and bytes, and each name expression's lowered name."""

    path: Path
    cubin: bytes
    lowered: dict[str, str]
    arch: str


_MEMO: dict[tuple[str, tuple[str, ...]], Compiled] = {}
_LOCK = threading.Lock()


def compile_module(names: list[str] | tuple[str, ...], arch: str) -> Compiled:
    """The cubin of the shared kernels for ``arch`` (e.g. ``sm_90``) with these instantiations.

    Memoised per process and cached on disk; raises :class:`NvrtcError` with NVRTC's log.
    """
    expressions = tuple(sorted(set(names)))
    memo_key = (arch, expressions)
    with _LOCK:
        if memo_key in _MEMO:
            return _MEMO[memo_key]
        reason = unavailable_reason()
        if reason is not None:
            raise NvrtcError(reason)
        key_text = json.dumps([source_hash(), expressions, arch, options_text(arch), nvrtc_version()])
        key = hashlib.sha256(key_text.encode()).hexdigest()[:20]
        directory = cache_root() / "nvrtc"
        cubin_path, names_path = directory / f"{key}.cubin", directory / f"{key}.json"
        if cubin_path.is_file() and names_path.is_file():
            compiled = Compiled(cubin_path, cubin_path.read_bytes(), json.loads(names_path.read_text()), arch)
        else:
            cubin, lowered = _compile(expressions, arch)
            directory.mkdir(parents=True, exist_ok=True)
            _write_atomically(names_path, json.dumps(lowered, indent=1).encode())
            _write_atomically(cubin_path, cubin)  # last: a cubin on disk always has its names
            compiled = Compiled(cubin_path, cubin, lowered, arch)
        _MEMO[memo_key] = compiled
        return compiled


def _compile(expressions: tuple[str, ...], arch: str) -> tuple[bytes, dict[str, str]]:
    from cuda.core import Program, ProgramOptions

    options = ProgramOptions(
        name="segloss.cu", arch=arch, std="c++17", include_path=include_dirs(), use_fast_math=False
    )
    try:
        program = Program(SOURCE, "c++", options)
        module = program.compile("cubin", name_expressions=expressions)
    except Exception as exc:  # cuda.core raises with NVRTC's log in the message
        raise NvrtcError(f"NVRTC failed for {arch}: {exc}") from exc
    lowered = {name: _as_str(module.symbol_mapping[name]) for name in expressions}
    return bytes(module.code), lowered


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def arch_of(capability: tuple[int, int]) -> str:
    """``(9, 0)`` -> ``sm_90``: cubins for the exact GPU (NVRTC supports it if the driver does)."""
    return f"sm_{capability[0]}{capability[1]}"


def declared_parameters(source: str, kernel: str) -> list[str]:
    """The parameter declarations of ``kernel`` in ``source`` (macros of kernel parameters
    expanded), e.g. ``['const T* logits', ...]``: what :data:`SIGNATURES` must agree with."""
    macros = dict(re.findall(r"#define (SEGLOSS_\w+_ARGS)\s+((?:.*\\\n)*.*)", source))
    macros = {name: body.replace("\\\n", " ") for name, body in macros.items()}
    match = re.search(rf"__global__ void (?:__launch_bounds__\(\w+\) )?{kernel}\((.*?)\)\s*\{{", source, re.S)
    if match is None:
        raise ValueError(f"kernel {kernel} not found")
    text = match.group(1)
    for name, body in macros.items():
        text = re.sub(rf"\b{name}\b", body, text)
    return [" ".join(p.split()) for p in text.split(",") if p.strip()]
