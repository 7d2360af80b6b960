"""The CuPy backend on a GPU: conformance, distance maps vs cupyx/scipy, DLPack interop (run_all.sh)."""

from __future__ import annotations

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu

from segloss_core import distance_maps as ref  # noqa: E402
from segloss_core import get_loss  # noqa: E402


@pytest.fixture(autouse=True)
def _needs_gpu():
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device")
    except Exception:  # noqa: BLE001
        pytest.skip("no CUDA device")


def test_conformance_of_the_cupy_backend():
    from segloss_core.conformance import check_backend

    report = check_backend("cupy")
    assert report.ok, str(report)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize(
    "name", ["dice", "dice_ce", "generalized_dice", "tversky", "cross_entropy", "boundary", "hausdorff_dt"]
)
def test_matches_the_reference(name, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 20, 18, 9)).astype(dtype)
    y = rng.integers(0, 4, size=(2, 20, 18, 9))
    want, want_grad = get_loss(name, backend="numpy").value_and_grad(x.astype(np.float64), y)
    loss = get_loss(name, backend="cupy")
    value, grad = loss.value_and_grad(cupy.asarray(x), cupy.asarray(y))
    assert isinstance(value, cupy.ndarray) and isinstance(grad, cupy.ndarray)
    assert grad.shape == x.shape
    tol = {"float16": 2e-2, "float32": 2e-4, "float64": 1e-6}[dtype]
    np.testing.assert_allclose(float(value), float(want), rtol=tol, atol=tol)
    np.testing.assert_allclose(cupy.asnumpy(grad).astype(np.float64), want_grad, rtol=tol * 10, atol=tol)


@pytest.mark.parametrize(
    ("spatial", "spacing"),
    [((24, 20, 13), None), ((24, 20, 13), (0.8, 0.8, 2.5)), ((40, 33), None), ((40, 33), (0.7, 1.9))],
)
def test_distance_maps_match_cupyx_and_scipy(spatial, spacing):
    from segloss_cupy import distance_map, mask_distance_map, signed_distance_map

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=(2, *spatial))
    labels[1][labels[1] == 3] = 0  # an absent class
    gpu = cupy.asarray(labels)
    cupyx_phi = ref.signed_distance_map(gpu, 4, spacing, reference=True)  # cupyx's exact EDT, float64
    assert isinstance(cupyx_phi, cupy.ndarray) and cupyx_phi.dtype == cupy.float64
    np.testing.assert_allclose(
        cupy.asnumpy(signed_distance_map(gpu, 4, spacing)), cupy.asnumpy(cupyx_phi), rtol=2e-6, atol=2e-6
    )
    for convention in ref.CONVENTIONS:
        got = cupy.asnumpy(signed_distance_map(gpu, 4, spacing, convention=convention))
        np.testing.assert_allclose(
            got, ref.signed_distance_map(labels, 4, spacing, convention=convention), rtol=2e-6, atol=2e-6
        )
    for region in ref.REGIONS:
        got = cupy.asnumpy(distance_map(gpu, 4, spacing, region=region))
        np.testing.assert_allclose(got, ref.distance_map(labels, 4, spacing, region=region), rtol=2e-6, atol=2e-6)
    d_in, d_out, _, has = ref.class_distances(gpu, 4, spacing)  # cupyx reference
    got = cupy.asnumpy(distance_map(gpu, 4, spacing, region="boundary"))
    np.testing.assert_allclose(got, cupy.asnumpy(cupy.where(has, d_in + d_out, 0)), rtol=2e-6, atol=2e-5)
    masks = cupy.asarray(rng.random((2, 3, *spatial)) < 0.3)
    got = cupy.asnumpy(mask_distance_map(masks, spacing))
    np.testing.assert_allclose(got, ref.mask_distance_map(cupy.asnumpy(masks), spacing), rtol=2e-6, atol=2e-6)


def test_dlpack_round_trip_with_torch():
    torch = pytest.importorskip("torch")
    logits = torch.randn(2, 3, 16, 16, 8, device="cuda", requires_grad=False)
    labels = torch.randint(0, 3, (2, 16, 16, 8), device="cuda")
    import segloss_cupy

    x = segloss_cupy.from_dlpack(logits)
    assert x.data.ptr == logits.data_ptr()  # zero copy in
    loss = get_loss("dice_ce", backend="cupy")
    _, grad = loss.value_and_grad(x, segloss_cupy.from_dlpack(labels))
    grad_t = segloss_cupy.to_dlpack(grad)
    assert grad_t.data_ptr() == grad.data.ptr  # zero copy out
    reference = get_loss("dice_ce", backend="torch")
    lt = logits.clone().requires_grad_(True)
    reference(lt, labels).backward()
    torch.testing.assert_close(grad_t, lt.grad, rtol=1e-4, atol=1e-6)


def test_runs_on_the_current_stream():
    rng = np.random.default_rng(2)
    x = cupy.asarray(rng.normal(size=(1, 3, 32, 32, 16)).astype(np.float32))
    y = cupy.asarray(rng.integers(0, 3, size=(1, 32, 32, 16)))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        value, grad = get_loss("dice_ce", backend="cupy").value_and_grad(x, y)
    stream.synchronize()
    assert np.isfinite(float(value)) and bool(cupy.isfinite(grad).all())


@pytest.mark.parametrize("name", ["dice", "dice_ce", "bce", "hausdorff_dt"])
def test_regions_match_the_reference(name):
    """Region-based training on CuPy: the fused kernels read the region membership table."""
    regions = ((1, 2, 3), (2, 3), (3,))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 20, 18, 9)).astype(np.float32)
    y = rng.integers(0, 5, size=(2, 20, 18, 9))  # label 4: the ignore label
    params = {"regions": regions, "ignore_index": 4, **({} if name == "bce" else {"activation": "sigmoid"})}
    want, want_grad = get_loss(name, backend="numpy", **params).value_and_grad(x.astype(np.float64), y)
    value, grad = get_loss(name, backend="cupy", **params).value_and_grad(cupy.asarray(x), cupy.asarray(y))
    np.testing.assert_allclose(float(value), float(want), rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(cupy.asnumpy(grad).astype(np.float64), want_grad, rtol=2e-3, atol=2e-4)
