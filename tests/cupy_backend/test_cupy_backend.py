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


def test_kernels_come_from_the_shared_nvrtc_loader():
    """CuPy compiles nothing of its own: every instantiation it asks for is one the shared loader
    compiles (tests/test_nvrtc.py compiles them all), from the same two-include source."""
    from segloss_csrc import nvrtc
    from segloss_cupy import kernels

    assert kernels.SOURCE is nvrtc.SOURCE and kernels.LAUNCH is nvrtc.LAUNCH
    assert kernels.SOURCE.count("#include") == 2 and "__global__" not in kernels.SOURCE
    requested = set()
    for dtype in ("float16", "float32", "float64"):
        for label_type in (None, *kernels.LABEL_TYPES):
            requested.update(kernels.region_names(dtype, label_type).values())
    for label_type in kernels.LABEL_TYPES:
        requested.update(kernels.edt_names(label_type).values())
    assert requested <= set(nvrtc.all_kernel_names())
