"""Region-based training (``regions=``): parameter checks, the membership table, the targets, the
float64 reference against hand-computed values and torch's native path, and ``regions_to_labels``."""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segloss_core import get_loss
from segloss_core.regions import check_regions, membership_table, region_targets, regions_to_labels

BRATS = ((1, 2, 3), (2, 3), (3,))
STATISTICS_LOSSES = (
    "dice",
    "jaccard",
    "tversky",
    "focal_tversky",
    "generalized_dice",
    "cross_entropy",
    "bce",
    "focal",
    "dice_ce",
    "dice_focal",
)


def test_membership_table():
    assert membership_table(BRATS) == (0, 0b001, 0b011, 0b111)
    assert membership_table(((0,), (5, 2))) == (1, 0, 2, 0, 0, 2)
    assert check_regions([[1, 2], 3, np.array([4, 5])], "loss") == ((1, 2), (3,), (4, 5))


@pytest.mark.parametrize(
    ("regions", "error", "match"),
    [
        ((), ValueError, "at least one region"),
        (((),), ValueError, "region 0 is empty"),
        (((1, 2), (2, 2)), ValueError, "region 1 .* names a label twice"),
        (((1, 2), (2, 1)), ValueError, "regions 0 and 1 are the same label set"),
        (((-1,),), ValueError, "outside the label range"),
        (((65536,),), ValueError, "outside the label range"),
        (tuple((i,) for i in range(65)), ValueError, "at most 64"),
        ("123", TypeError, "sequence of regions"),
        (((1.0,),), TypeError, "labels are integers"),
        (((True,),), TypeError, "labels are integers"),
    ],
)
def test_invalid_regions_name_the_parameter(regions, error, match):
    with pytest.raises(error, match=match) as info:
        get_loss("dice", backend="numpy", activation="sigmoid", regions=regions)
    assert "'regions'" in str(info.value)


def test_plan_checks():
    with pytest.raises(ValueError, match="activation='sigmoid'"):
        get_loss("dice", backend="numpy", regions=BRATS)  # softmax by default
    with pytest.raises(ValueError, match="ignore label"):
        get_loss("dice", backend="numpy", activation="sigmoid", regions=BRATS, ignore_index=3)
    with pytest.raises(ValueError, match="same regions"):
        from segloss_core import compound

        compound(
            [("dice", 1.0, {"activation": "sigmoid", "regions": BRATS}), ("bce", 1.0, {})],
            backend="numpy",
        )


def test_input_checks():
    loss = get_loss("dice", backend="numpy", activation="sigmoid", regions=BRATS, ignore_index=9)
    x = np.zeros((1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"regions names 3 regions .* pred has 2 channels"):
        loss(np.zeros((1, 2, 4, 4)), np.zeros((1, 4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=r"labels outside \[0, 4\) or ignore_index=9: found 4 .*largest label"):
        loss(x, np.full((1, 4, 4), 4))
    with pytest.raises(ValueError, match="integer label map"):
        loss(x, np.zeros((1, 3, 4, 4)))
    assert np.isfinite(loss(x, np.full((1, 4, 4), 9)))  # ignore_index may lie outside the table


def _hand_dice(p, g, smooth=1e-5):
    return 1.0 - (2 * (p * g).sum() + smooth) / (p.sum() + g.sum() + smooth)


def test_dice_hand_computed():
    """Two voxels, labels 2 and 0: region (1, 2, 3) has g = (1, 0), (2, 3) has (1, 0), (3,) has (0, 0)."""
    logits = np.array([[[0.5, -1.0], [2.0, 0.0], [-0.3, 1.5]]])  # (1, 3, 2)
    labels = np.array([[2, 0]])
    p = 1.0 / (1.0 + np.exp(-logits[0]))
    g = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    expected = np.mean([_hand_dice(p[r], g[r]) for r in range(3)])
    loss = get_loss("dice", backend="numpy", activation="sigmoid", regions=BRATS)
    assert float(loss(logits, labels)) == pytest.approx(expected, rel=1e-12)
    bce = get_loss("bce", backend="numpy", regions=BRATS)
    expected_bce = -np.mean(g * np.log(p) + (1 - g) * np.log(1 - p))
    assert float(bce(logits, labels)) == pytest.approx(expected_bce, rel=1e-12)


def test_region_loss_equals_loss_on_the_region_one_hot():
    """regions= on labels is the plain sigmoid loss on the region one-hot target (for every statistics loss)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 5, 4))
    y = rng.integers(0, 4, size=(2, 5, 4))
    one_hot = np.stack([np.isin(y, r) for r in BRATS], axis=1).astype(np.float64)
    for name in STATISTICS_LOSSES:
        params = {} if name == "bce" else {"activation": "sigmoid"}
        ours = get_loss(name, backend="numpy", regions=BRATS, **params)
        plain = get_loss(name, backend="numpy", **params)
        (v1, g1), (v2, g2) = ours.value_and_grad(x, y), plain.value_and_grad(x, one_hot)
        np.testing.assert_allclose(v1, v2, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(g1, g2, rtol=1e-12, atol=1e-15, err_msg=name)


def test_include_background_has_no_effect():
    """Every channel is a region: boundary/hausdorff_dt (include_background=False by default) count channel 0."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, 3, 6, 6))
    y = rng.integers(0, 4, size=(1, 6, 6))
    for name in ("boundary", "hausdorff_dt", "dice"):
        default = get_loss(name, backend="numpy", activation="sigmoid", regions=BRATS)
        all_channels = get_loss(name, backend="numpy", activation="sigmoid", regions=BRATS, classes=(0, 1, 2))
        assert float(default(x, y)) == pytest.approx(float(all_channels(x, y)), rel=1e-12)


def test_distance_losses_use_region_masks():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 3, 6, 5))
    y = rng.integers(0, 4, size=(2, 6, 5))
    y[0] = 0  # every region empty in sample 0
    masks = np.stack([np.isin(y, r) for r in BRATS], axis=1).astype(np.float64)
    for name in ("boundary", "hausdorff_dt", "log_hausdorff_dt"):
        ours = get_loss(name, backend="numpy", activation="sigmoid", regions=BRATS)
        plain = get_loss(name, backend="numpy", activation="sigmoid", include_background=True)
        (v1, g1), (v2, g2) = ours.value_and_grad(x, y), plain.value_and_grad(x, masks)
        np.testing.assert_allclose(v1, v2, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(g1, g2, rtol=1e-12, atol=1e-15, err_msg=name)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    spatial=st.sampled_from([(7,), (3, 4), (2, 3, 2)]),
    batch=st.integers(1, 3),
    ignored=st.sampled_from(["none", "some", "all", "one sample"]),
    empty_region=st.booleans(),
    name=st.sampled_from(STATISTICS_LOSSES),
    batch_dice=st.booleans(),
)
def test_torch_native_matches_reference(seed, spatial, batch, ignored, empty_region, name, batch_dice):
    """The torch native path and the float64 reference agree in value and gradient, with empty regions in a
    batch and ignored voxels (some, all of a sample, all)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=2.0, size=(batch, 3, *spatial))
    y = rng.integers(0, 4, size=(batch, *spatial))
    if empty_region:
        y[y == 3] = 2  # region (3,) empty in every sample
    if ignored == "some":
        y[rng.random(y.shape) < 0.3] = 255
    elif ignored == "all":
        y[:] = 255
    elif ignored == "one sample":
        y[0] = 255
    params = {} if name == "bce" else {"activation": "sigmoid"}
    if name in ("dice", "jaccard", "tversky", "focal_tversky", "generalized_dice", "dice_ce", "dice_focal"):
        params["batch"] = batch_dice
    ref = get_loss(name, backend="numpy", regions=BRATS, ignore_index=255, **params)
    value, grad = ref.value_and_grad(x, y)
    torch_loss = get_loss(name, backend="torch", regions=BRATS, ignore_index=255, impl="native", **params)
    xt = torch.tensor(x, requires_grad=True)
    out = torch_loss(xt, torch.from_numpy(y))
    out.backward()
    np.testing.assert_allclose(out.detach().numpy(), value, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(xt.grad.numpy(), grad, rtol=1e-9, atol=1e-12)


def _nnunet_convert_probabilities_to_segmentation(probabilities, regions_class_order):
    """Transcribed from nnunetv2 2.8.1 LabelManager.convert_probabilities_to_segmentation (regions branch):
    nnunetv2/utilities/label_handling/label_handling.py (its module needs acvl_utils, not installed here)."""
    segmentation = np.zeros(probabilities.shape[1:], dtype=np.uint16)
    for i, c in enumerate(regions_class_order):
        segmentation[probabilities[i] > 0.5] = c
    return segmentation


def test_regions_to_labels_as_nnunet():
    rng = np.random.default_rng(6)
    probabilities = rng.random((3, 5, 4, 3))
    expected = _nnunet_convert_probabilities_to_segmentation(probabilities, (1, 2, 3))
    np.testing.assert_array_equal(regions_to_labels(probabilities, (1, 2, 3), channel_axis=0), expected)
    batched = regions_to_labels(torch.from_numpy(probabilities[None]), (1, 2, 3))
    assert batched.dtype == torch.int64 and tuple(batched.shape) == (1, 5, 4, 3)
    np.testing.assert_array_equal(batched[0].numpy(), expected)


def test_regions_to_labels_round_trip():
    """Labels → region targets → regions_to_labels gives the labels back (BraTS's nested regions)."""
    labels = np.array([[0, 1, 2, 3, 2, 0]])
    g = region_targets(xp, labels, BRATS, xp.float64)
    np.testing.assert_array_equal(regions_to_labels(g, (1, 2, 3)), labels)
    with pytest.raises(ValueError, match="regions_class_order has 2 entries"):
        regions_to_labels(g, (1, 2))


def test_docs_example_runs():
    """The BraTS example of docs/regions.md runs and does what it says."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "regions.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    namespace: dict = {}
    exec(compile(block, "docs/regions.md", "exec"), namespace)
    assert torch.isfinite(namespace["value"]) and namespace["logits"].grad is not None
    segmentation = namespace["segmentation"]
    assert tuple(segmentation.shape) == (2, 16, 16, 16) and int(segmentation.max()) <= 3


@pytest.mark.parametrize("name", ["boundary", "hausdorff_dt"])
def test_distance_losses_with_regions_on_torch(name):
    """torch (its EDT kernels, or scipy) and the float64 reference agree with region masks and ignored voxels."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 3, 7, 6, 5))
    y = rng.integers(0, 4, size=(2, 7, 6, 5))
    y[1, :2] = 9
    params = {"activation": "sigmoid", "regions": BRATS, "ignore_index": 9}
    value, grad = get_loss(name, backend="numpy", **params).value_and_grad(x, y)
    xt = torch.tensor(x, requires_grad=True)
    out = get_loss(name, backend="torch", **params)(xt, torch.from_numpy(y))
    out.backward()
    np.testing.assert_allclose(out.detach().numpy(), value, rtol=1e-6)
    np.testing.assert_allclose(xt.grad.numpy(), grad, rtol=1e-5, atol=1e-9)


def test_jax_example_backend_takes_regions():
    """The JAX example computes the region targets with the same core helper (value and gradient)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 3, 5, 4))
    y = rng.integers(0, 5, size=(2, 5, 4))
    params = {"preset": "nnunet_regions", "regions": BRATS, "ignore_index": 4}
    value, grad = get_loss("dice_ce", backend="numpy", **params).value_and_grad(x, y)
    with jax.enable_x64(True):  # scoped: other tests see the global setting unchanged
        jax_loss = get_loss("dice_ce", backend="jax", **params)
        jax_value, jax_grad = jax_loss.value_and_grad(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(float(jax_value), value, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(jax_grad), grad, rtol=1e-10, atol=1e-15)
