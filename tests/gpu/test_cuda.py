"""The torch backend on CUDA: conformance, fused vs native, determinism, safety (run by run_all.sh)."""

from __future__ import annotations

import os

import pytest
import torch

from segloss_core import get_loss

pytestmark = pytest.mark.gpu


def _problem(shape, dtype=torch.float32, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 2).to(dtype).to(device)
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g).to(device)
    return x, y


def _value_and_grad(loss, x, *args):
    x = x.detach().clone().requires_grad_(True)
    value = loss(x, *args)
    value.backward()
    return value.detach(), x.grad


def test_fused_is_built_with_cuda():
    from segloss_torch import build, fused

    assert fused.is_built(), build.status().error
    assert build.status().with_cuda


def test_the_requested_cuda_path_is_active():
    """run_all.sh runs this file twice: the nvcc library, then SEGLOSS_CUDA_KERNELS=nvrtc."""
    from segloss_torch import build

    state = build.load()
    wanted = os.environ.get("SEGLOSS_CUDA_KERNELS", "auto")
    assert state.with_cuda, state.cuda_error
    if wanted in ("nvcc", "nvrtc"):
        assert state.cuda_path == wanted, state.cuda_error


def test_fused_runs_on_the_current_stream():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 5, 16, 16, 8, device="cuda", generator=g, requires_grad=True)
    y = torch.randint(0, 5, (2, 16, 16, 8), device="cuda", generator=g)
    loss = get_loss("dice_ce", backend="torch", impl="fused")
    reference, reference_grad = _value_and_grad(loss, x, y)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        value, grad = _value_and_grad(loss, x, y)
    side.synchronize()
    assert torch.equal(value, reference) and torch.equal(grad, reference_grad)


def test_conformance_on_cuda(monkeypatch):
    from segloss_core.conformance import check_backend

    monkeypatch.setenv("SEGLOSS_CONFORMANCE_DEVICE", "cuda")
    report = check_backend("torch")
    assert report.ok, str(report)


@pytest.mark.parametrize("name", ["dice", "dice_ce", "generalized_dice", "tversky", "bce", "cross_entropy"])
@pytest.mark.parametrize("channels", [1, 2, 4, 14, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_fused_matches_native_on_cuda(name, channels, dtype):
    if channels == 1 and name != "bce":
        activation = "sigmoid"
    else:
        activation = "sigmoid" if name == "bce" else "softmax"
    x, y = _problem((2, channels, 17, 33, 9), dtype)
    if channels == 1:
        y = (y > 0).long()
    params = {"activation": activation} if name != "bce" else {}
    v_n, g_n = _value_and_grad(get_loss(name, backend="torch", impl="native", **params), x, y)
    v_f, g_f = _value_and_grad(get_loss(name, backend="torch", impl="fused", **params), x, y)
    tol = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 1e-6)}.get(dtype, (1e-2, 1e-3))
    torch.testing.assert_close(v_f, v_n, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(g_f.float(), g_n.float(), rtol=tol[0] * 10, atol=tol[1])


def test_cpu_and_cuda_agree():
    x, y = _problem((2, 4, 32, 32, 16), torch.float64)
    loss = get_loss("dice_ce", backend="torch", impl="fused", preset="nnunet", ignore_index=255)
    y[:, 0] = 255
    v_c, g_c = _value_and_grad(loss, x, y)
    v_h, g_h = _value_and_grad(loss, x.cpu(), y.cpu())
    torch.testing.assert_close(v_c.cpu(), v_h, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_c.cpu(), g_h, rtol=1e-10, atol=1e-14)


def test_deterministic_bitwise_on_cuda():
    x, y = _problem((2, 14, 64, 64, 64))
    loss = get_loss("dice_ce", backend="torch", impl="fused")
    first = _value_and_grad(loss, x, y)
    for _ in range(3):
        again = _value_and_grad(loss, x, y)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    torch.use_deterministic_algorithms(True)
    try:
        value, _ = _value_and_grad(loss, x, y)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(value, first[0])


def test_out_of_range_labels_raise_before_launch_on_cuda():
    x, y = _problem((1, 3, 8, 8))
    y[0, 3, 3] = 9
    with pytest.raises(ValueError, match=r"labels outside \[0, 3\): found 9"):
        get_loss("dice", backend="torch", impl="fused")(x, y)


def test_mask_and_soft_targets_on_cuda():
    x, y = _problem((2, 3, 16, 16, 8), torch.float64)
    t = torch.softmax(torch.randn_like(x), 1)
    mask = (torch.rand(2, 1, 16, 16, 8, device="cuda", dtype=torch.float64) > 0.3).double()
    for target in (y, t):
        native = _value_and_grad(get_loss("dice_ce", backend="torch", impl="native"), x, target, mask)
        fused = _value_and_grad(get_loss("dice_ce", backend="torch", impl="fused"), x, target, mask)
        torch.testing.assert_close(fused[0], native[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fused[1], native[1], rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(os.environ.get("SEGLOSS_SKIP_COMPILE") == "1", reason="compile disabled")
def test_torch_compile_on_cuda():
    x, y = _problem((2, 4, 32, 32, 16))
    loss = get_loss("dice_ce", backend="torch", impl="fused")
    compiled = torch.compile(loss, fullgraph=True)
    torch.testing.assert_close(_value_and_grad(compiled, x, y)[1], _value_and_grad(loss, x, y)[1])


@pytest.mark.parametrize(
    ("spatial", "spacing"),
    [((37,), None), ((40, 33), (0.7, 1.9)), ((24, 20, 13), None), ((24, 20, 13), (0.8, 0.8, 2.5))],
)
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
def test_distance_maps_on_cuda_match_scipy(spatial, spacing, label_dtype):
    """The CUDA EDT (csrc/cuda/edt.cu) against scipy: every convention and region, ignore_index,
    an absent class, a class filling a whole sample, single voxels; the result stays on the GPU."""
    import numpy as np

    from segloss_core import distance_maps as ref
    from segloss_torch import distance_map, mask_distance_map, signed_distance_map

    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, size=(3, *spatial))
    labels[1][labels[1] == 3] = 0  # class 3 absent from sample 1
    labels[2] = 2  # class 2 fills sample 2 ...
    labels[2].flat[0] = 1  # ... but for a single voxel of class 1
    labels[0].flat[-1] = 200  # an ignored voxel
    gpu = torch.from_numpy(labels).to(label_dtype).cuda()
    for convention in ref.CONVENTIONS:
        got = signed_distance_map(gpu, 4, spacing, convention=convention, ignore_index=200)
        assert got.is_cuda and got.dtype == torch.float32
        want = ref.signed_distance_map(labels, 4, spacing, convention=convention, ignore_index=200)
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=2e-6, atol=2e-6)
    for region in ref.REGIONS:
        got = distance_map(gpu, 4, spacing, region=region, ignore_index=200)
        want = ref.distance_map(labels, 4, spacing, region=region, ignore_index=200)
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=2e-6, atol=2e-6)
    masks = torch.from_numpy(rng.random((2, 3, *spatial)) < 0.3)
    got = mask_distance_map(masks.cuda(), spacing)
    np.testing.assert_allclose(got.cpu().numpy(), ref.mask_distance_map(masks.numpy(), spacing), rtol=2e-6, atol=2e-6)


def test_distance_maps_cpu_and_cuda_agree_on_a_large_volume():
    from segloss_torch import signed_distance_map

    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 5, (2, 70, 65, 40), generator=g)
    cpu = signed_distance_map(labels, 5, (0.8, 0.8, 2.5))
    cuda = signed_distance_map(labels.cuda(), 5, (0.8, 0.8, 2.5))
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("regions", [((1, 2, 3), (2, 3), (3,)), tuple((c,) for c in range(1, 10))])
def test_fused_regions_match_native_on_cuda(regions, dtype):
    """Region-based training (regions=): the membership table read per voxel by the CUDA kernels."""
    g = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(2, len(regions), 17, 33, 9, device="cuda", generator=g) * 2).to(dtype)
    top = max(max(r) for r in regions)
    y = torch.randint(0, top + 1, (2, 17, 33, 9), device="cuda", generator=g)
    y[:, :2] = 200
    params = {"preset": "nnunet_regions", "regions": regions, "ignore_index": 200}
    v_n, g_n = _value_and_grad(get_loss("dice_ce", backend="torch", impl="native", **params), x, y)
    v_f, g_f = _value_and_grad(get_loss("dice_ce", backend="torch", impl="fused", **params), x, y)
    tol = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 1e-6)}.get(dtype, (1e-2, 1e-3))
    torch.testing.assert_close(v_f, v_n, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(g_f.float(), g_n.float(), rtol=tol[0] * 10, atol=tol[1])
