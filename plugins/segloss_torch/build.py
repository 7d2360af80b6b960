"""Just-in-time build of the fused kernels behind ``torch.ops.segloss`` (CPU and CUDA apart).

The op schemas, fake kernels and autograd live in Python (:mod:`segloss_torch.ops`); the
compiled libraries only add device kernels, in two independent parts:

- **cpu**: ``csrc/torch`` CPU loops, built with the C++ compiler alone (no CUDA toolkit);
- **cuda**: the ``csrc/cuda`` launchers and their glue, built with nvcc when a GPU and nvcc are
  there; without nvcc (pip-installed PyTorch ships none), or if that build fails, the same
  ``csrc/kernels`` sources are compiled at run time with NVRTC instead
  (:mod:`segloss_torch.nvrtc_kernels`, through the shared loader :mod:`segloss_csrc.nvrtc`).

A failure of one part never costs the other.

Cache. A library lives in ``<root>/segloss_<part>_<key>/`` where ``key`` hashes everything that
changes the binary — the kernel sources' contents, torch's version and git revision, its CUDA
version, the compiler's identity (``--version``), the flags, the CPU's features (``-march=native``),
the Python ABI and this module's build format — and nothing that does not: no checkout or venv
path. Two checkouts or venvs of the same code and torch therefore share one build. A build runs in
a private temporary directory under an OS lock (``fcntl.flock``, released by the kernel when its
holder dies, even by SIGKILL) and its library is published with an atomic rename, so a library is
never loaded half-written and a killed build leaves no lock behind. Leftover temporary
directories of killed builders are removed by the next builder.

The first build of a part says so on stderr (what, why, about how long, how to prebuild with
``segloss build`` or opt out with ``SEGLOSS_NO_BUILD=1``) and reports its outcome. Losses settle
the build when they are constructed, never inside ``forward`` (so ``torch.compile`` sees none).

Environment: ``SEGLOSS_BUILD_DIR`` (default ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/segloss``),
``SEGLOSS_NO_BUILD=1`` (never compile: native path only), ``SEGLOSS_CUDA_KERNELS`` (``auto``:
nvcc when found, else NVRTC; ``nvcc``; ``nvrtc``), ``SEGLOSS_CUDA_ARCH_LIST`` (default: torch's
``TORCH_CUDA_ARCH_LIST`` or the visible GPUs), ``SEGLOSS_VERBOSE_BUILD=1``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

import segloss_csrc

BUILD_FORMAT = 2  # bump when the way a library is produced changes


@dataclass(frozen=True)
class Part:
    """One independently built library: its sources (relative to ``segloss_csrc``) and cost."""

    name: str
    sources: tuple[str, ...]
    with_cuda: bool
    core_seconds: float  # typical total compile time on one core, for the announcement


CPU_PART = Part(
    "cpu",
    (
        "torch/common.cpp",
        "torch/host_buffers.cpp",
        "torch/region_stats_cpu.cpp",
        "torch/edt_cpu.cpp",
        "torch/prediction_labels_cpu.cpp",
        "torch/register_cpu.cpp",
    ),
    with_cuda=False,
    core_seconds=100.0,
)
CUDA_PART = Part(
    "cuda",
    ("torch/common.cpp", "torch/region_stats_cuda.cpp", "cuda/region_stats.cu", "torch/edt_cuda.cpp", "cuda/edt.cu"),
    with_cuda=True,
    core_seconds=600.0,
)
CPU_SOURCES = CPU_PART.sources
CUDA_SOURCES = CUDA_PART.sources
CUDA_KERNEL_CHOICES = ("auto", "nvcc", "nvrtc")


@dataclass
class BuildState:
    """What :func:`load` settled for this process (``loaded``: the CPU part; ``with_cuda``: CUDA
    kernels through either path, named by ``cuda_path``)."""

    attempted: bool = False
    loaded: bool = False
    with_cuda: bool = False
    cuda_path: str | None = None  # "nvcc" or "nvrtc"
    error: str | None = None  # why the CPU part is unavailable
    cuda_error: str | None = None  # why the CUDA part is unavailable (or why nvcc was not used)
    library: str | None = None
    cuda_library: str | None = None
    seconds: float = 0.0
    arch_list: str | None = None
    sources: list[str] = field(default_factory=list)


_STATE = BuildState()
_LOCK = threading.Lock()


class FusedBuildWarning(UserWarning):
    """The fused extension could not be built; the native implementation is used."""


class BuildError(RuntimeError):
    """A library could not be built or loaded (the message ends with the compiler's last lines)."""


# ---------------------------------------------------------------------------------------------
# the cache key


def _source_hash(root: Path) -> str:
    """Hash of every kernel source and header by relative name and content: any edit gives a new key."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".h", ".cuh", ".cu", ".cpp"):
            digest.update(str(path.relative_to(root).as_posix()).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


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
    return hashlib.sha256((platform.machine() + flags).encode()).hexdigest()[:8]


def _native_flags() -> list[str]:
    return ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"]


def _openmp_flags() -> list[str]:
    """at::parallel_for is OpenMP in torch's Linux wheels: without -fopenmp it runs serially.
    Linking -fopenmp names libgomp.so.1, the soname torch already loaded, so no second runtime."""
    return ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []


def cxx_compiler() -> str:
    """The C++ compiler torch's extension builder uses (``$CXX`` or ``c++``)."""
    return os.environ.get("CXX") or "c++"


def find_nvcc() -> Path | None:
    """nvcc as torch's extension builder finds it (CUDA_HOME/CUDA_PATH, else PATH), or None."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found) if found else None


def tool_identity(command: str | os.PathLike[str]) -> str:
    """``command --version`` (its text identifies the compiler; its path does not matter)."""
    try:
        result = subprocess.run([str(command), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({type(exc).__name__})"
    return (result.stdout + result.stderr).strip()


def _cuda_arch_list() -> str | None:
    explicit = os.environ.get("SEGLOSS_CUDA_ARCH_LIST") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if explicit:
        return explicit
    if not torch.cuda.is_available():
        return None
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in caps)


@dataclass(frozen=True)
class BuildRecipe:
    """Everything a build of one library depends on; ``key`` hashes all of it except paths."""

    name: str
    root: Path  # the source root (not part of the key: only the sources' contents are)
    sources: tuple[str, ...]
    cflags: tuple[str, ...]
    cuda_cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    with_cuda: bool = False
    arch_list: str | None = None

    def ingredients(self) -> dict[str, str]:
        items = {
            "format": str(BUILD_FORMAT),
            "name": self.name,
            "sources": _source_hash(self.root),
            "files": " ".join(self.sources),
            "torch": f"{torch.__version__} {torch.version.git_version}",
            "torch_cuda": str(torch.version.cuda),
            "cxx": tool_identity(cxx_compiler()),
            "cflags": " ".join(self.cflags),
            "ldflags": " ".join(self.ldflags),
            "cpu": _cpu_fingerprint(),
            "python": f"{sys.implementation.cache_tag} {sysconfig.get_config_var('SOABI')}",
            "platform": f"{sys.platform} {platform.machine()}",
        }
        if self.with_cuda:
            nvcc = find_nvcc()
            items["nvcc"] = tool_identity(nvcc) if nvcc else "absent"
            items["cuda_cflags"] = " ".join(self.cuda_cflags)
            items["arch"] = str(self.arch_list)
        return items

    def key(self) -> str:
        text = json.dumps(self.ingredients(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def recipe(part: Part, root: Path | None = None) -> BuildRecipe:
    root = segloss_csrc.source_dir() if root is None else root
    cflags = ["-O3", "-fno-math-errno", "-fno-trapping-math", *_native_flags(), *_openmp_flags()]
    return BuildRecipe(
        name=f"segloss_{part.name}",
        root=root,
        sources=part.sources,
        cflags=tuple(cflags),
        cuda_cflags=("-O3",) if part.with_cuda else (),
        ldflags=tuple(_openmp_flags()),
        with_cuda=part.with_cuda,
        arch_list=_cuda_arch_list() if part.with_cuda else None,
    )


def cache_root() -> Path:
    base = os.environ.get("SEGLOSS_BUILD_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(base) if base else Path.home() / ".cache" / "segloss"


def library_path(r: BuildRecipe, root: Path | None = None) -> Path:
    """Where the library of ``r`` is (or will be) published."""
    key = r.key()
    directory = (cache_root() if root is None else root) / f"{r.name}_torch{torch.__version__.split('+')[0]}_{key}"
    return directory / f"{r.name}_{key}.so"


# ---------------------------------------------------------------------------------------------
# lock, temporary build, atomic publication


@contextlib.contextmanager
def exclusive(lock_file: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on ``lock_file``: the kernel releases it when the holder exits
    or is killed, so no lock outlives its process. The file itself is never removed (removing a
    flock file lets two processes hold "the" lock at once)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())  # for people, not for the lock
        yield
    finally:
        os.close(fd)


def _remove_leftovers(directory: Path) -> None:
    """Temporary directories of builders that died (only the lock holder builds here)."""
    for leftover in directory.glob("tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@dataclass
class BuildResult:
    library: Path
    built: bool  # compiled by this call (else found in the cache)
    seconds: float
    loaded_by_build: bool  # torch's builder already loaded it into this process


def build_library(
    r: BuildRecipe,
    *,
    root: Path | None = None,
    verbose: bool = False,
    announce: Callable[[BuildRecipe, Path], None] | None = None,
    on_wait: Callable[[Path], None] | None = None,
) -> BuildResult:
    """The published library of ``r``, compiled first if the cache has none. Never loads a partial file.

    The compile runs in ``<dir>/tmp-<host>-<pid>-*`` under the directory's flock; the finished
    library is renamed into place (atomic on one file system). Another process waiting on the
    lock finds the published library when it gets the lock and compiles nothing.
    """
    library = library_path(r, root)
    start = time.perf_counter()
    if library.is_file():
        return BuildResult(library, False, 0.0, False)
    directory = library.parent
    directory.mkdir(parents=True, exist_ok=True)
    with exclusive(directory / "lock", None if on_wait is None else (lambda: on_wait(directory / "lock"))):
        if library.is_file():  # built by the process we waited for
            return BuildResult(library, False, time.perf_counter() - start, False)
        _remove_leftovers(directory)
        (directory / "key.json").write_text(json.dumps(r.ingredients(), indent=1, sort_keys=True) + "\n")
        if announce is not None:
            announce(r, directory)
        tmp = Path(tempfile.mkdtemp(prefix=f"tmp-{socket.gethostname()}-{os.getpid()}-", dir=directory))
        try:
            from torch.utils import cpp_extension

            if r.with_cuda and r.arch_list:
                os.environ.setdefault("TORCH_CUDA_ARCH_LIST", r.arch_list)
            try:
                cpp_extension.load(
                    name=library.stem,
                    sources=[str(r.root / s) for s in r.sources],
                    extra_cflags=list(r.cflags),
                    extra_cuda_cflags=list(r.cuda_cflags) or None,
                    extra_ldflags=list(r.ldflags),
                    extra_include_paths=[str(r.root)],
                    build_directory=str(tmp),
                    with_cuda=r.with_cuda,
                    is_python_module=False,
                    verbose=verbose,
                )
            except Exception as exc:  # the compiler's output is in the message
                raise BuildError(f"{type(exc).__name__}: {_last_lines(str(exc))}") from exc
            produced = sorted(tmp.glob("*.so"))
            if not produced:
                raise BuildError(f"the build in {tmp} produced no library")
            os.replace(produced[0], library)  # atomic: readers see no file or the whole file
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return BuildResult(library, True, time.perf_counter() - start, True)


def load_library(path: Path) -> None:
    torch.ops.load_library(str(path))


# ---------------------------------------------------------------------------------------------
# messages


def _estimate(r: BuildRecipe, part: Part) -> str:
    cores = max(1, min(os.cpu_count() or 1, len(r.sources)))
    seconds = part.core_seconds / cores
    return f"about {seconds:.0f} s" if seconds < 90 else f"about {seconds / 60:.0f} min"


def _say(text: str) -> None:
    print(f"segloss: {text}", file=sys.stderr, flush=True)


def _announcer(part: Part) -> Callable[[BuildRecipe, Path], None]:
    what = "CPU kernels (C++ compiler)" if part.name == "cpu" else "CUDA kernels (nvcc)"

    def announce(r: BuildRecipe, directory: Path) -> None:
        ingredients = r.ingredients()
        compiler = ingredients["cxx"].splitlines()[0] if ingredients["cxx"] else "?"
        _say(
            f"compiling the fused {what} once: no build in the cache yet for these sources, torch "
            f"{torch.__version__}, compiler ({compiler}), flags and CPU ({directory}). This takes "
            f"{_estimate(r, part)}; every later process, checkout or venv with the same code and torch loads it "
            "at once. Prebuild with `segloss build`; set SEGLOSS_NO_BUILD=1 to skip compiling (the native torch "
            "implementation is used, same results, more memory)."
        )

    return announce


def _waiting(lock: Path) -> None:
    _say(f"waiting for another process that is building the same kernels (lock {lock})")


# ---------------------------------------------------------------------------------------------
# the process-wide state


def _cuda_preference() -> str:
    value = os.environ.get("SEGLOSS_CUDA_KERNELS", "auto").strip().lower() or "auto"
    if value not in CUDA_KERNEL_CHOICES:
        raise ValueError(f"SEGLOSS_CUDA_KERNELS must be one of {', '.join(CUDA_KERNEL_CHOICES)}, got {value!r}")
    return value


def _verbose(verbose: bool | None) -> bool:
    return os.environ.get("SEGLOSS_VERBOSE_BUILD", "") not in ("", "0") if verbose is None else verbose


def _ensure(part: Part, verbose: bool, announce: bool) -> tuple[Path, float]:
    """Build (if needed) and load one part; raises BuildError."""
    r = recipe(part)
    result = build_library(
        r, verbose=verbose, announce=_announcer(part) if announce else None, on_wait=_waiting if announce else None
    )
    if not result.loaded_by_build:
        try:
            load_library(result.library)
        except Exception as exc:  # e.g. an undefined symbol
            raise BuildError(f"{result.library} does not load: {type(exc).__name__}: {exc}") from exc
    if result.built and announce:
        _say(f"fused {part.name.upper()} kernels built in {result.seconds:.0f} s: {result.library}")
    return result.library, result.seconds


def load(verbose: bool | None = None) -> BuildState:
    """Settle the fused kernels once per process: build what is missing, load it; never raises."""
    global _STATE
    if _STATE.attempted:
        return _STATE
    with _LOCK:
        if _STATE.attempted:
            return _STATE
        from . import ops  # the schemas, fake kernels and autograd (no compiled code needed)

        ops.define()
        state = BuildState(attempted=True)
        if os.environ.get("SEGLOSS_NO_BUILD", "").strip() not in ("", "0"):
            state.error = state.cuda_error = "SEGLOSS_NO_BUILD is set"
            _STATE = state
            return state
        verbose = _verbose(verbose)
        root = segloss_csrc.source_dir()
        state.sources = [str(root / n) for n in CPU_PART.sources]
        start = time.perf_counter()
        try:
            library, _ = _ensure(CPU_PART, verbose, announce=True)
            state.loaded, state.library = True, str(library)
        except BuildError as exc:
            state.error = str(exc)
        _settle_cuda(state, verbose)
        state.seconds = time.perf_counter() - start
        _STATE = state
        if not state.loaded:
            _say(f"the fused CPU kernels are unavailable ({_last_lines(state.error or '', 2)})")
            warnings.warn(
                f"segloss: the fused C++/CUDA kernels could not be built ({state.error}); using the native torch "
                "implementation (same results, more memory). Run `segloss build` for details.",
                FusedBuildWarning,
                stacklevel=3,
            )
        return state


def cuda_plan(preference: str, torch_cuda: bool, gpu: bool, nvcc: bool) -> tuple[list[str], str | None]:
    """Which CUDA paths to try, in order, and why there are none (pure logic, tested on its own).

    ``auto`` prefers the nvcc-built library where nvcc exists (no per-launch Python, the path
    verified on GPUs the longest) and falls back to NVRTC when nvcc is absent or its build fails.
    """
    if not torch_cuda:
        return [], "torch was built without CUDA"
    if not gpu:
        return [], "no CUDA device is visible"
    if preference == "nvrtc":
        return ["nvrtc"], None
    if preference == "nvcc":
        return (["nvcc"], None) if nvcc else ([], "SEGLOSS_CUDA_KERNELS=nvcc but nvcc is not installed")
    return (["nvcc", "nvrtc"] if nvcc else ["nvrtc"]), None


def _settle_cuda(state: BuildState, verbose: bool) -> None:
    try:
        preference = _cuda_preference()
    except ValueError as exc:
        state.cuda_error = str(exc)
        return
    nvcc = find_nvcc() is not None
    paths, reason = cuda_plan(preference, bool(torch.version.cuda), torch.cuda.is_available(), nvcc)
    if reason is not None:
        state.cuda_error = reason
        return
    errors = [] if nvcc or preference == "nvrtc" else ["nvcc: not installed"]
    for path in paths:
        if path == "nvcc":
            try:
                state.arch_list = _cuda_arch_list()
                library, _ = _ensure(CUDA_PART, verbose, announce=True)
                state.with_cuda, state.cuda_path, state.cuda_library = True, "nvcc", str(library)
                break
            except BuildError as exc:
                errors.append(f"nvcc: {exc}")
        else:
            from . import nvrtc_kernels

            why = nvrtc_kernels.unavailable_reason()
            if why is None:
                nvrtc_kernels.register()
                state.with_cuda, state.cuda_path = True, "nvrtc"
                _say("the fused CUDA kernels are compiled with NVRTC on first use (seconds per dtype, cached on disk)")
                break
            errors.append(f"nvrtc: {why}")
    state.cuda_error = "; ".join(errors) or None


def _last_lines(text: str, count: int = 12) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:])


def status() -> BuildState:
    return _STATE


def cached_library(part: Part = CPU_PART) -> Path | None:
    """The compiled library of ``part`` for the current sources, torch, compiler and CPU, if on disk."""
    try:
        library = library_path(recipe(part))
    except OSError:
        return None
    return library if library.is_file() else None
