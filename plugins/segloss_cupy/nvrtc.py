"""Compile the shared kernels with NVRTC directly (ctypes), without CuPy or a GPU.

Used by the tests (and by anyone checking a toolchain) so that a kernel that NVRTC would reject
cannot land even where no GPU is available; CuPy itself compiles the same source and options
(:mod:`segloss_cupy.kernels`) at run time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from pathlib import Path

from . import kernels


class NvrtcError(RuntimeError):
    pass


def _candidates() -> list[str]:
    found: list[str] = []
    try:
        import nvidia  # the nvidia-cuda-nvrtc wheels

        for root in getattr(nvidia, "__path__", []):
            found += sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*")))
            found += sorted(glob.glob(os.path.join(root, "cuda_nvrtc", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            found += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")))
    system = ctypes.util.find_library("nvrtc")
    if system:
        found.append(system)
    return [f for f in found if "builtins" not in f and ".alt." not in f]


def load_library() -> ctypes.CDLL | None:
    """libnvrtc, with its builtins preloaded; None if not installed."""
    for path in _candidates():
        try:
            directory = Path(path).parent
            for builtins in sorted(directory.glob("libnvrtc-builtins.so*")):
                if ".alt." not in builtins.name:
                    ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def include_dirs() -> list[str]:
    dirs = [str(kernels.include_dir())]
    try:
        import nvidia

        for root in getattr(nvidia, "__path__", []):
            dirs += sorted(str(p) for p in Path(root).glob("*/include") if (p / "cuda_fp16.h").exists())
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_fp16.h").exists():
            dirs.append(str(Path(home) / "include"))
    return dirs


def compile_kernels(names: list[str], arch: str = "compute_90") -> str:
    """Compile the segloss module for these name expressions; returns the PTX size report.

    Raises :class:`NvrtcError` with NVRTC's log if compilation fails, or if NVRTC is missing.
    """
    lib = load_library()
    if lib is None:
        raise NvrtcError("libnvrtc not found (pip install nvidia-cuda-nvrtc)")
    program = ctypes.c_void_p()
    status = lib.nvrtcCreateProgram(ctypes.byref(program), kernels.SOURCE.encode(), b"segloss.cu", 0, None, None)
    if status != 0:
        raise NvrtcError(f"nvrtcCreateProgram failed with status {status}")
    try:
        for name in names:
            lib.nvrtcAddNameExpression(program, name.encode())
        options = [opt.encode() for opt in kernels.nvrtc_options()]
        options += [f"-I{d}".encode() for d in include_dirs()[1:]]
        options.append(f"--gpu-architecture={arch}".encode())
        array = (ctypes.c_char_p * len(options))(*options)
        status = lib.nvrtcCompileProgram(program, len(options), array)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(program, log)
        if status != 0:
            raise NvrtcError(log.value.decode(errors="replace"))
        ptx_size = ctypes.c_size_t()
        lib.nvrtcGetPTXSize(program, ctypes.byref(ptx_size))
        return f"{len(names)} kernels, {ptx_size.value} bytes of PTX"
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def all_kernel_names() -> list[str]:
    names: set[str] = set()
    for dtype in ("float16", "float32", "float64"):
        for label_type in (None, *kernels.LABEL_TYPES):
            names.update(kernels.region_names(dtype, label_type).values())
    for label_type in kernels.LABEL_TYPES:
        names.update(kernels.edt_names(label_type).values())
    return sorted(names)
