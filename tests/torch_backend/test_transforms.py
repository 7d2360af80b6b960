"""segloss_torch.transforms.SignedDistanceMapd: values vs the float64 reference, spacing from metadata."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segloss_core.distance_maps import signed_distance_map as reference_maps
from segloss_torch.transforms import SignedDistanceMapd, spacing_from_metadata


def _volume(shape=(14, 12, 9), seed=0) -> np.ndarray:
    """(1, *shape) labels 0..3: boxes and a ball, every class with a boundary."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.int64)
    labels[2:9, 3:10, 1:6] = 1
    labels[8:13, 1:5, 4:8] = 2
    grid = np.indices(shape)
    labels[((grid - np.array([4, 8, 5])[:, None, None, None]) ** 2).sum(0) <= 5] = 3
    labels[tuple(rng.integers(0, s) for s in shape)] = 3  # a single voxel as well
    return labels[None]


def _reference(labels: np.ndarray, spacing, **kwargs) -> np.ndarray:
    return reference_maps(labels, 4, spacing, reference=True, **kwargs)[0]


@pytest.mark.parametrize("convention", ["boundary_loss", "signed", "signed_inside_positive"])
@pytest.mark.parametrize("spacing", [(0.8, 0.8, 2.5), (1.0, 3.0, 0.5), 1.5])
def test_values_equal_the_reference_with_spacing(convention, spacing):
    labels = _volume()
    sample = {"label": torch.from_numpy(labels), "image": torch.zeros(1, *labels.shape[1:])}
    out = SignedDistanceMapd("label", 4, spacing=spacing, convention=convention)(sample)
    phi = out["label_distance_map"]
    assert phi.shape == (4, *labels.shape[1:]) and phi.dtype == torch.float32
    np.testing.assert_allclose(phi.numpy(), _reference(labels, spacing, convention=convention), rtol=1e-6, atol=1e-5)
    assert out["image"] is sample["image"] and out["label"] is sample["label"]  # the rest passes through


def test_numpy_labels_integral_floats_ignore_index_and_several_keys():
    labels = _volume(seed=1)
    second = _volume(seed=2)
    second[0, 0, 0, 0] = 255
    out = SignedDistanceMapd(["a", "b"], 4, output_keys=["phi_a", "phi_b"], spacing=(1, 2, 1), ignore_index=255)(
        {"a": labels.astype(np.float32), "b": second}
    )
    np.testing.assert_allclose(out["phi_a"].numpy(), _reference(labels, (1, 2, 1)), rtol=1e-6, atol=1e-5)
    want = _reference(second, (1, 2, 1), ignore_index=255)
    np.testing.assert_allclose(out["phi_b"].numpy(), want, rtol=1e-6, atol=1e-5)


def test_spacing_from_the_affine_of_a_meta_tensor_and_from_a_meta_dict():
    labels = _volume(seed=3)
    want = _reference(labels, (0.8, 0.7, 2.5))
    affine = np.diag([0.8, 0.7, 2.5, 1.0])
    affine[:3, :3] = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]]) @ affine[:3, :3]  # a world rotation: same norms
    transform = SignedDistanceMapd("label", 4)
    meta_dict = {"label": torch.from_numpy(labels), "label_meta_dict": {"affine": torch.from_numpy(affine)}}
    np.testing.assert_allclose(transform(meta_dict)["label_distance_map"].numpy(), want, rtol=1e-6, atol=1e-5)
    pixdim = {"label": labels, "label_meta_dict": {"pixdim": np.array([1.0, 0.8, 0.7, 2.5, 1, 1, 1, 1])}}
    np.testing.assert_allclose(transform(pixdim)["label_distance_map"].numpy(), want, rtol=1e-6, atol=1e-5)
    monai_data = pytest.importorskip("monai.data")
    meta_tensor = monai_data.MetaTensor(torch.from_numpy(labels), affine=torch.from_numpy(affine))
    assert spacing_from_metadata(meta_tensor, None, 3) == pytest.approx(tuple(float(v) for v in meta_tensor.pixdim))
    np.testing.assert_allclose(
        transform({"label": meta_tensor})["label_distance_map"].numpy(), want, rtol=1e-6, atol=1e-5
    )
    explicit = SignedDistanceMapd("label", 4, spacing=1.0)({"label": meta_tensor})  # the explicit value wins
    np.testing.assert_allclose(explicit["label_distance_map"].numpy(), _reference(labels, 1.0), rtol=1e-6, atol=1e-5)


def test_whole_volume_map_then_crop_in_a_monai_pipeline():
    """Before the crop, listed among its keys: the patch's map is the whole map cropped, not the patch's map."""
    transforms = pytest.importorskip("monai.transforms")
    labels = _volume((20, 18, 10), seed=4)
    pipeline = transforms.Compose(
        [
            SignedDistanceMapd("label", 4, spacing=(0.8, 0.8, 2.5)),
            transforms.SpatialCropd(
                keys=["image", "label", "label_distance_map"], roi_start=(9, 2, 3), roi_end=(19, 12, 9)
            ),
        ]
    )
    out = pipeline({"image": torch.rand(1, 20, 18, 10), "label": torch.from_numpy(labels)})
    whole = _reference(labels, (0.8, 0.8, 2.5))[:, 9:19, 2:12, 3:9]
    np.testing.assert_allclose(np.asarray(out["label_distance_map"]), whole, rtol=1e-6, atol=1e-5)
    assert tuple(out["image"].shape) == (1, 10, 10, 6)
    local = _reference(labels[:, 9:19, 2:12, 3:9], (0.8, 0.8, 2.5))
    assert np.abs(local - whole).max() > 1.0  # what computing it on the patch would have got wrong


def test_errors_name_the_key_and_the_fix():
    labels = torch.from_numpy(_volume())
    with pytest.raises(ValueError, match=r"no voxel spacing for 'label'.*pass spacing="):
        SignedDistanceMapd("label", 4)({"label": labels})
    voxels = SignedDistanceMapd("label", 4, require_spacing=False)({"label": labels})["label_distance_map"]
    np.testing.assert_allclose(voxels.numpy(), _reference(labels.numpy(), None), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match=r"channel-first label image \(1, \*spatial\).*label\[None\]"):
        SignedDistanceMapd("label", 4, spacing=1.0)({"label": labels[0]})
    with pytest.raises(ValueError, match="non-integer values"):
        SignedDistanceMapd("label", 4, spacing=1.0)({"label": labels * 0.5})
    with pytest.raises(KeyError, match="key 'seg' is not in the sample"):
        SignedDistanceMapd("seg", 4, spacing=1.0)({"label": labels})
    assert SignedDistanceMapd("seg", 4, spacing=1.0, allow_missing_keys=True)({"label": labels}).keys() == {"label"}
    with pytest.raises(ValueError, match="labels outside"):
        SignedDistanceMapd("label", 3, spacing=1.0)({"label": labels})
    for kwargs, match in [
        ({"num_classes": 0}, "num_classes must be a positive int"),
        ({"num_classes": 4, "convention": "x"}, "convention must be one of"),
        ({"num_classes": 4, "spacing": (1.0, -2.0)}, "spacing must be positive"),
        ({"num_classes": 4, "output_keys": ["a", "b"]}, "output_keys has 2 keys for 1 keys"),
    ]:
        with pytest.raises(ValueError, match=match):
            SignedDistanceMapd("label", **kwargs)
