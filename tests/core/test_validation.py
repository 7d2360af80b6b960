"""The input contract: clear errors before any computation, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segloss_core import get_loss, validate_inputs


def _arrays(backend, pred, target, mask=None):
    if backend == "torch":
        conv = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        return conv(pred), conv(target), conv(mask)
    return pred, target, mask


def _call(backend, pred, target, mask=None, **params):
    loss = get_loss("dice", backend=backend, **params)
    p, t, m = _arrays(backend, pred, target, mask)
    return loss(p, t, m)


@pytest.fixture
def good(rng):
    return rng.normal(size=(2, 3, 4, 5)), rng.integers(0, 3, size=(2, 4, 5))


def test_integer_predictions_are_refused(backend, good):
    _, labels = good
    with pytest.raises(TypeError, match=r"pred must be floating point .*argmax"):
        _call(backend, np.zeros((2, 3, 4, 5), dtype=np.int64), labels)


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 4, 5, 6, 7), (3,)])
def test_pred_dimensionality(backend, shape):
    with pytest.raises(ValueError, match=r"pred must have shape \(B, C, \*spatial\) with 1 to 3 spatial dims"):
        _call(backend, np.zeros(shape), np.zeros((2,), dtype=np.int64))


def test_empty_tensors(backend):
    with pytest.raises(ValueError, match=r"pred is empty \(shape \(0, 3, 4\)\)"):
        _call(backend, np.zeros((0, 3, 4)), np.zeros((0, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=r"pred is empty"):
        _call(backend, np.zeros((1, 3, 0)), np.zeros((1, 0), dtype=np.int64))


def test_softmax_needs_two_channels(backend):
    with pytest.raises(ValueError, match=r"activation='softmax' with a single channel .* use activation='sigmoid'"):
        _call(backend, np.zeros((1, 1, 4)), np.zeros((1, 4), dtype=np.int64))


def test_label_shape_mismatch_names_both_shapes(backend, good):
    pred, _ = good
    with pytest.raises(
        ValueError, match=r"integer target must have shape \(B, \*spatial\) = \(2, 4, 5\).*got \(2, 5, 4\)"
    ):
        _call(backend, pred, np.zeros((2, 5, 4), dtype=np.int64))


def test_labels_with_channel_axis_are_accepted(backend, good):
    pred, labels = good
    a = _call(backend, pred, labels[:, None])
    b = _call(backend, pred, labels)
    assert float(a) == pytest.approx(float(b), rel=1e-12)


@pytest.mark.parametrize("bad", [3, -1, 255])
def test_out_of_range_labels_name_the_value(backend, good, bad):
    pred, labels = good
    labels = labels.copy()
    labels[1, 2, 3] = bad
    with pytest.raises(ValueError, match=rf"target has labels outside \[0, 3\): found {bad}"):
        _call(backend, pred, labels)


def test_ignore_index_is_exempt_but_other_bad_labels_are_not(backend, good):
    pred, labels = good
    labels = labels.copy()
    labels[0, 0, 0] = 255
    _call(backend, pred, labels, ignore_index=255)
    labels[0, 0, 1] = 7
    with pytest.raises(ValueError, match=r"outside \[0, 3\) or ignore_index=255: found 7"):
        _call(backend, pred, labels, ignore_index=255)


def test_sigmoid_single_channel_labels_are_binary(backend, rng):
    pred = rng.normal(size=(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"outside \[0, 2\): found 2"):
        _call(backend, pred, np.full((2, 4, 4), 2), activation="sigmoid")


def test_float_label_map_is_refused_with_advice(backend, good):
    pred, labels = good
    with pytest.raises(ValueError, match=r"floating label map .* pass integer labels"):
        _call(backend, pred, labels[:, None].astype(np.float64))


def test_ignore_index_needs_labels(backend, good):
    pred, labels = good
    onehot = np.eye(3)[labels].transpose(0, 3, 1, 2)
    with pytest.raises(ValueError, match=r"ignore_index applies to integer label targets.*mask="):
        _call(backend, pred, onehot, ignore_index=0)


def test_mask_shape_and_dtype(backend, good):
    pred, labels = good
    with pytest.raises(ValueError, match=r"mask must have shape"):
        _call(backend, pred, labels, np.ones((2, 2, 4, 5)))
    with pytest.raises(TypeError, match=r"mask must be bool or floating point"):
        _call(backend, pred, labels, np.ones((2, 4, 5), dtype=np.int64))
    for shape in [(2, 4, 5), (2, 1, 4, 5), (2, 3, 4, 5), (1, 1, 4, 5)]:
        _call(backend, pred, labels, np.ones(shape))


def test_class_weights_length_checked_against_channels(backend, good):
    pred, labels = good
    with pytest.raises(ValueError, match=r"class_weights has 2 entries but pred has 3 channels"):
        _call(backend, pred, labels, class_weights=[1.0, 2.0])


def test_non_array_inputs(backend, good):
    _, labels = good
    loss = get_loss("dice", backend=backend)
    with pytest.raises(TypeError, match="pred must be a"):
        loss([[[1.0]]], _arrays(backend, labels, labels)[1])


def test_target_or_mask_from_another_library_is_named(good):
    """A NumPy target with a torch pred says so (not "target is on device cpu but pred is on cpu")."""
    pred, labels = good
    plan = get_loss("dice", backend="numpy").plan

    with pytest.raises(TypeError, match=r"target is a numpy array but pred is a torch array"):
        validate_inputs(torch.from_numpy(pred), labels, None, plan)
    with pytest.raises(TypeError, match=r"target is a numpy array but pred is a torch array"):
        get_loss("dice", backend="torch")(torch.from_numpy(pred), labels)
    with pytest.raises(TypeError, match=r"mask is a torch array but pred is a numpy array"):
        validate_inputs(pred, labels, torch.ones(2, 4, 5), plan)


def test_target_on_another_device_is_named(good):
    """A GPU where there is one, else ``meta``: a second device every machine has."""
    pred, labels = good
    other = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "meta"
    with pytest.raises(ValueError, match=r"target is on device .* but pred is on cpu"):
        get_loss("dice", backend="torch")(torch.from_numpy(pred), torch.from_numpy(labels).to(other))
    with pytest.raises(ValueError, match=r"mask is on device .* but pred is on cpu"):
        get_loss("dice", backend="torch")(
            torch.from_numpy(pred), torch.from_numpy(labels), torch.ones(2, 4, 5, device=other)
        )


BAD_INPUTS = {
    "label == C": lambda p, t: (p, np.where(t == 0, 3, t)),
    "negative label": lambda p, t: (p, np.where(t == 0, -1, t)),
    "float label map": lambda p, t: (p, t.astype(np.float64)),
    "target shape": lambda p, t: (p, t[:, :-1]),
    "integer pred": lambda p, t: (p.astype(np.int64), t),
}


@pytest.mark.parametrize("impl", ["auto", "native"])
@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
def test_bad_input_raises_before_any_computation(good, monkeypatch, bad, impl):
    """README: "Bad input raises a clear error ... before any computation": with every way to compute
    (the executor, the native statistics, the fused ops, the reference statistics) made to explode,
    a bad input still gets its ValueError/TypeError, so none of them ran."""
    import segloss_core.reference.statistics as reference_statistics
    import segloss_torch.module as torch_module
    from segloss_torch import native

    def exploded(*args, **kwargs):
        raise AssertionError("a computation ran before the input was checked")

    monkeypatch.setattr(torch_module, "run_plan", exploded)
    monkeypatch.setattr(native, "compute_statistics", exploded)
    monkeypatch.setattr(reference_statistics, "compute", exploded)
    pred, target = BAD_INPUTS[bad](*good)
    with pytest.raises((ValueError, TypeError)) as caught:
        get_loss("dice", backend="torch", impl=impl)(torch.from_numpy(pred), torch.from_numpy(target))
    assert "pred" in str(caught.value) or "target" in str(caught.value)
    with pytest.raises((ValueError, TypeError)):
        get_loss("dice", backend="numpy")(pred, target)


@pytest.mark.parametrize(("activation", "bad_value"), [("softmax", np.nan), ("softmax", np.inf), ("sigmoid", np.nan)])
def test_undefined_logits_give_non_finite_loss(backend, good, activation, bad_value):
    """Documented behaviour: no finiteness check (a pass over the logits). NaN, or +inf under softmax
    (inf − inf), has no probability: the loss shows it."""
    pred, labels = good
    pred = pred.copy()
    pred[0, 1, 2, 2] = bad_value
    for name in ("dice", "cross_entropy", "dice_ce"):
        loss = get_loss(name, backend=backend, activation=activation)
        p, t, _ = _arrays(backend, pred, labels)
        assert not np.isfinite(float(loss(p, t))), name


@pytest.mark.parametrize(("activation", "bad_value"), [("softmax", -np.inf), ("sigmoid", np.inf), ("sigmoid", -np.inf)])
def test_saturating_infinite_logits_act_as_their_limit(backend, good, activation, bad_value):
    """An infinity that only saturates the activation is its limit, p = 0 or 1 exactly: the loss equals the
    loss at logit ±1e30 (finite for region losses, +inf for a log term on a zero probability)."""
    pred, labels = good
    at_inf, at_big = pred.copy(), pred.copy()
    at_inf[0, 1, 2, 2] = bad_value
    at_big[0, 1, 2, 2] = np.sign(bad_value) * 1e30
    for name in ("dice", "tversky", "cross_entropy", "dice_ce"):
        loss = get_loss(name, backend=backend, activation=activation)
        p_inf, t, _ = _arrays(backend, at_inf, labels)
        p_big, _, _ = _arrays(backend, at_big, labels)
        v_inf, v_big = float(loss(p_inf, t)), float(loss(p_big, t))
        if np.isfinite(v_big) and v_big < 1e20:
            assert v_inf == pytest.approx(v_big, rel=1e-12), name
        else:  # −log p at the true class with p = 0
            assert v_inf == np.inf, name


def test_torch_rejects_numpy_and_mixed_inputs(good):
    pred, labels = good
    loss = get_loss("dice", backend="torch")
    with pytest.raises(TypeError, match=r"pred must be a torch\.Tensor"):
        loss(pred, torch.from_numpy(labels))


def test_unexpected_call_argument():
    loss = get_loss("dice", backend="torch")
    with pytest.raises(TypeError, match=r"unexpected call argument\(s\) \['weights'\]"):
        loss(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long), weights=None)


def _one_hot(labels, channels):
    return np.eye(channels, dtype=np.int64)[labels]  # channels last, as torch.nn.functional.one_hot returns


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("integer one-hot, channels last", r"integer one-hot target in the channels-last layout.*movedim\(-1, 1\)"),
        ("integer one-hot, channels first", r"integer one-hot target: pass target\.float\(\)"),
        ("pred without batch", r"pred of shape \(3, 4, 5, 6\) looks like it has no batch dimension.*pred\[None\]"),
        ("pred without batch, target with", r"pred of shape \(3, 4, 5, 6\) looks like it has no batch dimension"),
        ("pred channels last", r"pred of shape \(2, 4, 5, 6, 3\) looks channels-last.*pred\.movedim\(-1, 1\)"),
    ],
)
def test_layout_mistakes_name_the_fix(backend, rng, case, message):
    """The common layout mistakes get an error about the argument that is wrong, with the fix."""
    pred = rng.normal(size=(2, 3, 4, 5, 6))
    labels = rng.integers(0, 3, size=(2, 4, 5, 6))
    pred, target = {
        "integer one-hot, channels last": (pred, _one_hot(labels, 3)),
        "integer one-hot, channels first": (pred, np.moveaxis(_one_hot(labels, 3), -1, 1)),
        "pred without batch": (pred[0], labels[0]),
        "pred without batch, target with": (pred[0], labels[:1]),
        "pred channels last": (np.moveaxis(pred, 1, -1), labels),
    }[case]
    with pytest.raises(ValueError, match=message):
        _call(backend, pred, target)
