"""Just-in-time build of the C++/CUDA extension (``torch.ops.segloss``).

The kernel sources ship inside the wheel (package ``segloss_csrc``). On first use they are
compiled with ``torch.utils.cpp_extension.load`` (ninja) into a cache directory keyed by the
sources' hash, the torch version and the CUDA version, so an upgrade never loads a stale
library; torch's own file lock makes concurrent builds by several processes safe (one builds,
the others wait and load). ``segloss build`` prebuilds and reports. If the build fails, the
reason is kept (``status()``) and the backend falls back to the native path with one warning.

Environment: ``SEGLOSS_BUILD_DIR`` (default ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/segloss``), ``SEGLOSS_NO_BUILD=1`` (never compile: native path only),
``SEGLOSS_CUDA_ARCH_LIST`` (default: torch's ``TORCH_CUDA_ARCH_LIST`` or the visible GPUs),
``SEGLOSS_VERBOSE_BUILD=1``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

import segloss_csrc

CPU_SOURCES = ("torch/ops.cpp", "torch/region_stats_cpu.cpp", "torch/edt_cpu.cpp")
CUDA_SOURCES = ("torch/region_stats_cuda.cpp", "cuda/region_stats.cu", "torch/edt_cuda.cpp", "cuda/edt.cu")


@dataclass
class BuildState:
    attempted: bool = False
    loaded: bool = False
    with_cuda: bool = False
    error: str | None = None
    library: str | None = None
    seconds: float = 0.0
    arch_list: str | None = None
    sources: list[str] = field(default_factory=list)


_STATE = BuildState()
_LOCK = threading.Lock()


class FusedBuildWarning(UserWarning):
    """The fused extension could not be built; the native implementation is used."""


def _cuda_wanted() -> bool:
    return bool(torch.version.cuda) and torch.cuda.is_available()


def _source_hash(root: Path) -> str:
    """Hash of every kernel source and header: any edit gives a new build directory."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".h", ".cuh", ".cu", ".cpp"):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _cpu_fingerprint() -> str:
    """Hash of the CPU's feature flags: builds use -march=native, so a cache shared between
    different machines (a cluster home directory) must not hand one CPU another's library."""
    try:
        flags = next(
            (line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features"))),
            "",
        )
    except OSError:
        flags = ""
    import platform

    return hashlib.sha256((platform.machine() + flags).encode()).hexdigest()[:8]


def _native_flags() -> list[str]:
    import platform

    return ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"]


def _openmp_flags() -> list[str]:
    """at::parallel_for is OpenMP in torch's Linux wheels: without -fopenmp it runs serially.
    Linking -fopenmp names libgomp.so.1, the soname torch already loaded, so no second runtime."""
    return ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []


def build_directory(tag: str, create: bool = True) -> Path:
    base = os.environ.get("SEGLOSS_BUILD_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "segloss"
    cuda = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    path = root / f"{py}_torch{torch.__version__.split('+')[0]}_{cuda}" / tag
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def _cuda_arch_list() -> str | None:
    explicit = os.environ.get("SEGLOSS_CUDA_ARCH_LIST") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if explicit:
        return explicit
    if not torch.cuda.is_available():
        return None
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in caps)


def load(verbose: bool | None = None) -> BuildState:
    """Build (if needed) and load the extension once per process; never raises."""
    global _STATE
    if _STATE.attempted:
        return _STATE
    with _LOCK:
        if _STATE.attempted:
            return _STATE
        state = BuildState(attempted=True)
        if os.environ.get("SEGLOSS_NO_BUILD", "").strip() not in ("", "0"):
            state.error = "SEGLOSS_NO_BUILD is set"
            _STATE = state
            return state
        root = segloss_csrc.source_dir()
        with_cuda = _cuda_wanted()
        names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
        tag = f"segloss_ops_{_source_hash(root)}_{_cpu_fingerprint()}"
        state.with_cuda = with_cuda
        state.sources = [str(root / n) for n in names]
        start = time.perf_counter()
        try:
            from torch.utils import cpp_extension

            if with_cuda:
                arch = _cuda_arch_list()
                state.arch_list = arch
                if arch:
                    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", arch)
            verbose = os.environ.get("SEGLOSS_VERBOSE_BUILD", "") not in ("", "0") if verbose is None else verbose
            cpp_extension.load(
                name=tag,
                sources=state.sources,
                extra_cflags=["-O3", "-fno-math-errno", "-fno-trapping-math", *_native_flags(), *_openmp_flags()]
                + (["-DSEGLOSS_WITH_CUDA"] if with_cuda else []),
                extra_ldflags=_openmp_flags(),
                extra_cuda_cflags=["-O3"] if with_cuda else None,
                extra_include_paths=[str(root)],
                build_directory=str(build_directory(tag)),
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=verbose,
            )
            state.loaded = True
            state.library = str(build_directory(tag) / f"{tag}.so")
        except Exception as exc:  # noqa: BLE001 - any build failure means "use native"
            state.error = f"{type(exc).__name__}: {_last_lines(str(exc))}"
        state.seconds = time.perf_counter() - start
        _STATE = state
        if not state.loaded:
            warnings.warn(
                f"segloss: the fused C++/CUDA kernels could not be built ({state.error}); using the native torch "
                "implementation (same results, more memory). Run `segloss build` for details.",
                FusedBuildWarning,
                stacklevel=3,
            )
        return state


def _last_lines(text: str, count: int = 12) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:])


def status() -> BuildState:
    return _STATE


def cached_library() -> Path | None:
    """The compiled library for the current sources, torch, CUDA and CPU, if already on disk."""
    try:
        tag = f"segloss_ops_{_source_hash(segloss_csrc.source_dir())}_{_cpu_fingerprint()}"
        library = build_directory(tag, create=False) / f"{tag}.so"
    except OSError:
        return None
    return library if library.exists() else None
