"""The CuPy backend where no GPU is: importable, listed as unavailable, kernels valid for NVRTC."""

from __future__ import annotations

import importlib

import pytest

from segloss_core import get_loss, list_backends
from segloss_core.registry import BackendUnavailableError


def test_package_imports_without_cupy():
    for module in (
        "segloss_cupy",
        "segloss_cupy.plugin",
        "segloss_cupy.backend",
        "segloss_cupy.kernels",
        "segloss_cupy.fused",
        "segloss_cupy.distance_maps",
        "segloss_cupy.nvrtc",
    ):
        importlib.import_module(module)


def test_listed_with_its_state():
    info = {b.name: b for b in list_backends()}["cupy"]
    try:
        import cupy

        has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001
        has_gpu = False
    if has_gpu:
        assert info.available
    else:
        assert info.state == "unavailable" and info.reason
        with pytest.raises(BackendUnavailableError, match="'cupy' is not available here"):
            get_loss("dice", backend="cupy")


def test_shared_kernels_compile_with_nvrtc():
    """The exact source and options CuPy compiles at run time, for every instantiation it uses."""
    from segloss_cupy import nvrtc

    if nvrtc.load_library() is None:
        pytest.skip("libnvrtc not installed (pip install nvidia-cuda-nvrtc)")
    for arch in ("compute_80", "compute_90"):
        report = nvrtc.compile_kernels(nvrtc.all_kernel_names(), arch=arch)
        assert "kernels" in report


def test_kernel_source_is_not_copied_into_python():
    from segloss_cupy import kernels

    assert kernels.SOURCE.count("#include") == 2 and "__global__" not in kernels.SOURCE
    assert kernels.nvrtc_options()[-1].startswith("-DSEGLOSS_SOURCE_HASH=")
