"""Parameters in any combination: torch (fused and native) against the float64 reference, drawn by hypothesis."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from segloss_core import get_loss

region_params = st.fixed_dictionaries(
    {},
    optional={
        "include_background": st.booleans(),
        "batch": st.booleans(),
        "smooth_nr": st.sampled_from([0.0, 1e-5, 1.0]),
        "smooth_dr": st.sampled_from([0.0, 1e-5, 1.0]),
        "clamp_dr": st.sampled_from([0.0, 1e-8, 0.5]),
        "squared": st.booleans(),
        "soft_intersection": st.booleans(),
        "absent_classes": st.sampled_from(["smooth", "zero", "exclude"]),
        "class_weight_normalization": st.sampled_from(["count", "weight_sum", "rows"]),
        "count_excluded_classes": st.booleans(),
        "zero_division": st.sampled_from([0.0, 1.0]),
        "loss_form": st.sampled_from(["one_minus", "negative", "negative_log"]),
        "reduction": st.sampled_from(["mean", "sum", "none"]),
    },
)


@given(
    params=region_params,
    name=st.sampled_from(["dice", "jaccard", "tversky"]),
    target_kind=st.sampled_from(["labels", "labels+ignore", "soft"]),
    use_mask=st.booleans(),
    weighted=st.booleans(),
    channels=st.integers(2, 4),
    spatial=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
    impl=st.sampled_from(["fused", "native"]),
)
def test_region_losses_any_combination(params, name, target_kind, use_mask, weighted, channels, spatial, seed, impl):
    rng = np.random.default_rng(seed)
    if name == "tversky":
        params.pop("squared", None)
    x = rng.normal(scale=2.0, size=(2, channels, *spatial))
    if target_kind == "soft":
        t = rng.random((2, channels, *spatial))
        target = t / t.sum(axis=1, keepdims=True)
    else:
        target = rng.integers(0, channels, size=(2, *spatial))
        if target_kind == "labels+ignore":
            target[rng.random(target.shape) < 0.3] = 255
            params["ignore_index"] = 255
    mask = rng.random((2, 1, *spatial)) * (rng.random((2, 1, *spatial)) > 0.2) if use_mask else None
    if weighted:
        params["class_weights"] = list(rng.uniform(0.1, 3.0, size=channels))
    reference = get_loss(name, backend="numpy", **params)
    value = reference(x, target, mask)
    grad_output = np.ones_like(value) if np.ndim(value) else None
    value, grad = reference.value_and_grad(x, target, mask, grad_output=grad_output)
    loss = get_loss(name, backend="torch", impl=impl, **params)
    xt = torch.tensor(x, requires_grad=True)
    got = loss(xt, torch.from_numpy(target), None if mask is None else torch.from_numpy(mask))
    got.sum().backward()
    np.testing.assert_allclose(got.detach().numpy(), value, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(xt.grad.numpy(), grad, rtol=1e-8, atol=1e-11)
    assert np.all(np.isfinite(grad))
