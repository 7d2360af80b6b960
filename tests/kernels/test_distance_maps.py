"""Distance maps: the fast exact kernels against scipy (and brute force), conventions, edge cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.ndimage import distance_transform_edt

from segloss_core import distance_maps as ref
from segloss_torch import distance_map, mask_distance_map, signed_distance_map


def _close(got: torch.Tensor, want: np.ndarray) -> None:
    """Equal to the float64 reference up to float32 rounding of the distances."""
    got = got.double().numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def brute_force_distance(mask: np.ndarray, spacing) -> np.ndarray:
    """O(N²) distance of every voxel to the nearest True voxel (an oracle independent of any EDT)."""
    points = np.argwhere(mask).astype(float) * np.asarray(spacing)
    grid = np.argwhere(np.ones_like(mask)).astype(float) * np.asarray(spacing)
    if len(points) == 0:
        return np.full(mask.shape, np.inf)
    d = np.sqrt(((grid[:, None, :] - points[None, :, :]) ** 2).sum(-1)).min(1)
    return d.reshape(mask.shape)


spatial_st = st.lists(st.integers(1, 9), min_size=1, max_size=3)
spacing_st = st.sampled_from([None, "aniso"])


@given(
    shape=spatial_st,
    classes=st.integers(1, 5),
    density=st.floats(0.0, 1.0),
    spacing=spacing_st,
    convention=st.sampled_from(ref.CONVENTIONS),
    seed=st.integers(0, 2**16),
)
def test_signed_maps_match_scipy(shape, classes, density, spacing, convention, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=(2, *shape))
    labels[rng.random(labels.shape) < density] = 0  # big background, absent and full classes
    sp = None if spacing is None else tuple(rng.uniform(0.5, 3.0, size=len(shape)).round(2))
    got = signed_distance_map(torch.from_numpy(labels), classes, sp, convention=convention)
    _close(got, ref.signed_distance_map(labels, classes, sp, convention=convention))


@given(
    shape=spatial_st,
    classes=st.integers(2, 4),
    spacing=spacing_st,
    region=st.sampled_from(ref.REGIONS),
    ignore=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_unsigned_maps_match_scipy(shape, classes, spacing, region, ignore, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=(2, *shape))
    ignore_index = None
    if ignore:
        ignore_index = 255
        labels[rng.random(labels.shape) < 0.2] = 255
    sp = None if spacing is None else tuple(rng.uniform(0.5, 3.0, size=len(shape)).round(2))
    got = distance_map(torch.from_numpy(labels), classes, sp, region=region, ignore_index=ignore_index)
    _close(got, ref.distance_map(labels, classes, sp, region=region, ignore_index=ignore_index))


@given(shape=spatial_st, channels=st.integers(1, 3), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_mask_maps_match_scipy(shape, channels, density, seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((2, channels, *shape)) < density
    sp = tuple(rng.uniform(0.5, 2.0, size=len(shape)))
    for kind in ref.CONVENTIONS + ref.REGIONS:
        _close(mask_distance_map(torch.from_numpy(masks), sp, kind=kind), ref.mask_distance_map(masks, sp, kind=kind))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 2.5), (2.0, 0.5, 1.3)])
def test_against_brute_force(spacing):
    rng = np.random.default_rng(3)
    labels = (rng.random((1, 6, 7, 5)) < 0.15).astype(np.int64)
    got = distance_map(torch.from_numpy(labels), 2, spacing, region="outside")[0, 1].double().numpy()
    want = brute_force_distance(labels[0] == 1, spacing)
    want = np.where(labels[0] == 1, 0.0, want)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def test_single_voxel_gives_exact_euclidean_distances():
    labels = torch.zeros(1, 9, 10, 11, dtype=torch.long)
    labels[0, 4, 5, 6] = 1
    spacing = (1.5, 1.0, 0.5)
    phi = signed_distance_map(labels, 2, spacing, convention="signed")[0, 1]
    grid = np.stack(np.meshgrid(np.arange(9), np.arange(10), np.arange(11), indexing="ij")).astype(float)
    expected = np.sqrt(
        (((grid - np.array([4, 5, 6])[:, None, None, None]) * np.array(spacing)[:, None, None, None]) ** 2).sum(0)
    )
    expected[4, 5, 6] = -0.5  # inside: −d_in, the nearest outside voxel is 0.5 away along the last axis
    np.testing.assert_allclose(phi.double().numpy(), expected, rtol=1e-6)


def test_elongated_structures():
    labels = np.zeros((1, 3, 64, 5), dtype=np.int64)
    labels[0, 1, :, 2] = 1  # a long thin line
    labels[0, :, 10, :] = 2  # a plane crossing it
    _close(
        signed_distance_map(torch.from_numpy(labels), 3, (1.0, 0.3, 2.0)),
        ref.signed_distance_map(labels, 3, (1.0, 0.3, 2.0)),
    )


def test_full_and_empty_classes_get_the_no_boundary_value_not_scipys_artefact():
    labels = np.ones((2, 5, 6), dtype=np.int64)  # class 1 fills sample 0 and 1; classes 0 and 2 absent
    # scipy alone, on a mask without background, returns distances to a phantom voxel:
    assert distance_transform_edt(labels[0] == 1).max() > 0
    for value in (0.0, -7.0):
        phi = signed_distance_map(torch.from_numpy(labels), 3, no_boundary_value=value)
        assert torch.all(phi == value)
        assert np.all(ref.signed_distance_map(labels, 3, no_boundary_value=value) == value)


def test_boundary_loss_convention_matches_one_hot2dist():
    """LIVIAETS utils.one_hot2dist, transcribed: negmask·edt(negmask) − (edt(posmask) − 1)·posmask."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, size=(1, 12, 9))
    spacing = (1.0, 2.0)
    expected = np.zeros((3, 12, 9))
    for k in range(3):
        pos = labels[0] == k
        if pos.any():
            neg = ~pos
            expected[k] = (
                distance_transform_edt(neg, sampling=spacing) * neg
                - (distance_transform_edt(pos, sampling=spacing) - 1) * pos
            )
    _close(signed_distance_map(torch.from_numpy(labels), 3, spacing)[0], expected)


def test_normalisation():
    labels = torch.zeros(1, 10, 10, dtype=torch.long)
    labels[0, 3:6, 3:6] = 1
    phi = signed_distance_map(labels, 2, normalize="max")
    assert torch.isclose(phi.abs().amax(dim=(2, 3)), torch.ones(1, 2)).all()
    extent = signed_distance_map(labels, 2, (2.0, 1.0), normalize="extent")
    raw = signed_distance_map(labels, 2, (2.0, 1.0))
    torch.testing.assert_close(extent, raw / float(np.hypot(20.0, 10.0)))


def test_label_dtypes_and_batches_are_independent():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 4, size=(3, 11, 8))
    full = signed_distance_map(torch.from_numpy(labels), 4)
    for dtype in (torch.int32, torch.uint8, torch.int64):
        torch.testing.assert_close(signed_distance_map(torch.from_numpy(labels).to(dtype), 4), full)
    for b in range(3):
        torch.testing.assert_close(signed_distance_map(torch.from_numpy(labels[b : b + 1]), 4), full[b : b + 1])


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (({"spacing": (1.0,)}), ValueError, "spacing has 1 values but the label map has 2 spatial dims"),
        (({"spacing": (1.0, -1.0)}), ValueError, "spacing must be positive"),
        (({"convention": "sdf"}), ValueError, "convention must be one of"),
    ],
)
def test_bad_arguments(args, error, match):
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(error, match=match):
        signed_distance_map(labels, 2, **args)
    with pytest.raises(TypeError, match="integer label map"):
        signed_distance_map(torch.zeros(1, 4, 4), 2)


def test_numpy_entry_point_dispatches_to_torch():
    labels = torch.randint(0, 3, (1, 6, 5))
    via_core = ref.signed_distance_map(labels, 3)
    assert isinstance(via_core, torch.Tensor)
    torch.testing.assert_close(via_core, signed_distance_map(labels, 3))


def test_reference_switch():
    labels = np.random.default_rng(3).integers(0, 3, (2, 9, 7))
    np.testing.assert_array_equal(
        ref.signed_distance_map(labels, 3, (1.0, 2.0), reference=True), ref.signed_distance_map(labels, 3, (1.0, 2.0))
    )
    np.testing.assert_array_equal(ref.distance_map(labels, 3, reference=True), ref.distance_map(labels, 3))
    with pytest.raises(TypeError, match=r"reference=True takes NumPy or CuPy labels"):
        ref.signed_distance_map(torch.from_numpy(labels), 3, reference=True)
    with pytest.raises(TypeError, match=r"reference must be True or False"):
        ref.distance_map(labels, 3, reference="yes")


@pytest.mark.usefixtures("fused_kernels")
def test_kernel_is_used_and_is_fast_path_for_absent_classes():
    labels = torch.zeros(1, 40, 40, 40, dtype=torch.long)
    labels[0, 10:20, 10:30, 5:35] = 1
    for convention, region in itertools.product(ref.CONVENTIONS, ref.REGIONS):
        assert signed_distance_map(labels, 50, convention=convention)[:, 2:].abs().sum() == 0
        assert distance_map(labels, 50, region=region)[:, 2:].abs().sum() == 0


def test_cuda_grid_limit_is_checked_before_any_launch():
    ref.check_cuda_volumes(ref.CUDA_MAX_VOLUMES, "labels")  # the limit itself is fine
    with pytest.raises(ValueError, match=r"labels: 65536 maps in one call on the GPU, at most 65535"):
        ref.check_cuda_volumes(65536, "labels")


def test_without_the_compiled_ops_the_reference_gives_the_same_maps(monkeypatch):
    """The module's promise: without the extension the float64 reference runs on the CPU instead,
    with the same values, dtype and device as the kernels' result."""
    from segloss_torch import fused

    labels = torch.from_numpy(np.random.default_rng(5).integers(0, 3, (2, 7, 6, 5)))
    masks = labels[:, None] == 1
    expected = {
        "signed": ref.signed_distance_map(labels.numpy(), 3, (1.0, 2.0, 0.5), reference=True),
        "unsigned": ref.distance_map(labels.numpy(), 3, (1.0, 2.0, 0.5), reference=True),
        "mask": ref.mask_distance_map(masks.numpy(), (1.0, 2.0, 0.5)),
    }
    monkeypatch.setattr(fused, "available_on", lambda device_type: False)
    got = {
        "signed": signed_distance_map(labels, 3, (1.0, 2.0, 0.5)),
        "unsigned": distance_map(labels, 3, (1.0, 2.0, 0.5)),
        "mask": mask_distance_map(masks, (1.0, 2.0, 0.5)),
    }
    for name, value in got.items():
        assert isinstance(value, torch.Tensor) and value.device == labels.device, name
        np.testing.assert_allclose(value.double().numpy(), expected[name], rtol=1e-6, atol=1e-6, err_msg=name)


def blob_labels(shape: tuple[int, ...], classes: int, seed: int) -> np.ndarray:
    """(1, *shape) labels of smooth blobs: the argmax over classes of smoothed noise (long runs,
    touching objects, as a medical label map; not voxel noise)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((classes, *shape))
    smooth = np.stack([gaussian_filter(n, sigma=max(1.0, min(shape) / 6)) for n in noise])
    return smooth.argmax(0)[None]


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [
        ((300,), (0.7,)),
        ((48, 37), (0.8, 2.5)),
        ((24, 31, 18), (0.8, 0.8, 2.5)),
        ((20, 16, 26), (2.5, 1.0, 0.6)),
    ],
)
@pytest.mark.parametrize("classes", [2, 4])
def test_blob_volumes_match_scipy(shape, spacing, classes):
    labels = blob_labels(shape, classes, seed=len(shape) + classes)
    for convention in ref.CONVENTIONS:
        got = signed_distance_map(torch.from_numpy(labels), classes, spacing, convention=convention)
        _close(got, ref.signed_distance_map(labels, classes, spacing, convention=convention))
    for region in ref.REGIONS:
        got = distance_map(torch.from_numpy(labels), classes, spacing, region=region)
        _close(got, ref.distance_map(labels, classes, spacing, region=region))
    masks = labels[:, None] == np.arange(classes).reshape(1, classes, *([1] * len(shape)))
    _close(mask_distance_map(torch.from_numpy(masks), spacing), ref.mask_distance_map(masks, spacing))


@given(
    shape=st.lists(st.integers(1, 30), min_size=1, max_size=3),
    classes=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_structured_volumes_match_scipy(shape, classes, seed):
    """Smooth blobs of random shape (long runs, lines of one voxel, classes absent or filling)."""
    labels = blob_labels(tuple(shape), classes, seed)
    sp = tuple(np.random.default_rng(seed).uniform(0.4, 3.0, size=len(shape)).round(2))
    got = signed_distance_map(torch.from_numpy(labels), classes, sp, convention="signed")
    _close(got, ref.signed_distance_map(labels, classes, sp, convention="signed"))


def test_single_voxel_objects_of_several_classes_with_anisotropic_spacing():
    labels = np.zeros((1, 11, 9, 13), dtype=np.int64)
    labels[0, 2, 3, 4] = 1
    labels[0, 8, 1, 11] = 2
    labels[0, 5, 8, 0] = 3  # on the border
    spacing = (0.8, 1.7, 2.5)
    phi = signed_distance_map(torch.from_numpy(labels), 4, spacing, convention="signed")[0].double().numpy()
    for c in (1, 2, 3):
        want = brute_force_distance(labels[0] == c, spacing)
        want[labels[0] == c] = -min(spacing)  # −d_in: the nearest other voxel is one step along the finest axis
        np.testing.assert_allclose(phi[c], want, rtol=2e-6, atol=2e-6)
    _close(torch.from_numpy(phi[None]), ref.signed_distance_map(labels, 4, spacing, convention="signed"))


def test_labels_outside_the_classes_belong_to_none():
    labels = np.array([[[0, 1, 7, 1], [-3, 1, 1, 0], [2, 2, 300, 0]]])  # 7, -3, 300: no class of 3
    got = signed_distance_map(torch.from_numpy(labels), 3, (1.0, 2.0))
    _close(got, ref.signed_distance_map(np.where((labels >= 0) & (labels < 3), labels, 99), 3, (1.0, 2.0)))


def test_more_classes_than_a_byte():
    rng = np.random.default_rng(11)
    labels = rng.choice([0, 1, 256, 299], size=(1, 9, 8))
    got = signed_distance_map(torch.from_numpy(labels), 300)
    want = ref.signed_distance_map(labels, 300)
    _close(got, want)
    assert got[0, 256].abs().sum() > 0 and got[0, 2].abs().sum() == 0


@pytest.mark.parametrize("shape", [(6, 300), (3, 4, 290), (2, 260, 3)])
def test_long_runs_match_brute_force(shape):
    """Runs longer than 128 voxels (the stack algorithm) next to short ones (the direct minimum)."""
    last = shape[-1]
    labels = np.zeros((1, *shape), dtype=np.int64)
    labels[(0, *[s // 2 for s in shape[:-1]], min(7, last - 1))] = 1
    labels[(0, *[0 for _ in shape[:-1]], last - 1)] = 1
    labels[(0, *[s - 1 for s in shape[:-1]], 150 % last)] = 1
    spacing = (1.3, 0.7, 2.1)[: len(shape)]
    got = distance_map(torch.from_numpy(labels), 2, spacing, region="boundary")[0].double().numpy()
    inside = labels[0] == 1
    want = brute_force_distance(inside, spacing)  # d_out off the objects
    outside_points = np.argwhere(~inside) * np.asarray(spacing)
    for voxel in np.argwhere(inside):  # d_in on them: to the nearest background voxel
        want[tuple(voxel)] = np.sqrt((((outside_points - voxel * np.asarray(spacing)) ** 2).sum(1)).min())
    for c in (0, 1):  # d_in + d_out is the distance to the other side, for both classes
        np.testing.assert_allclose(got[c], want, rtol=2e-6, atol=2e-6)
