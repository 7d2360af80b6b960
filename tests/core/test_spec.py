"""Parameter checking at get_loss time: names, types, ranges, combinations, presets."""

from __future__ import annotations

import numpy as np
import pytest

from segloss_core import Param, describe, get_loss, list_losses
from segloss_core.registry import UnknownBackendError, UnknownLossError


def test_unknown_loss_suggests_close_match():
    with pytest.raises(UnknownLossError, match=r"unknown loss 'dise' \(did you mean 'dice'\?\).*registered losses"):
        get_loss("dise", backend="numpy")


def test_unknown_backend_suggests_close_match():
    with pytest.raises(UnknownBackendError, match=r"did you mean 'torch'"):
        get_loss("dice", backend="troch")


def test_unknown_parameter_names_it_and_lists_valid_ones():
    with pytest.raises(TypeError, match=r"unknown parameter 'smooth' .*valid parameters: activation"):
        get_loss("dice", backend="numpy", smooth=1.0)
    with pytest.raises(TypeError, match=r"did you mean 'smooth_nr'"):
        get_loss("dice", backend="numpy", smooth_n=1.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"smooth_nr": "1e-5"}, TypeError, r"parameter 'smooth_nr' must be float in \[0, inf\), got str"),
        ({"smooth_nr": -1.0}, ValueError, r"parameter 'smooth_nr' must be float in \[0, inf\), got -1.0"),
        ({"smooth_dr": float("nan")}, ValueError, r"'smooth_dr'"),
        ({"batch": 1}, TypeError, r"parameter 'batch' must be a bool, got int"),
        ({"activation": "softmx"}, ValueError, r"'activation' must be one of 'softmax', 'sigmoid', 'none'.*softmax"),
        ({"reduction": "avg"}, ValueError, r"'reduction' must be one of 'mean', 'sum', 'none'"),
        ({"class_weights": [1.0, -2.0]}, ValueError, r"'class_weights'"),
        ({"class_weights": 3.0}, TypeError, r"'class_weights' must be sequence of float"),
        ({"ignore_index": 2.5}, TypeError, r"'ignore_index' must be int or None"),
        ({"zero_division": 2.0}, ValueError, r"'zero_division' must be float in \[0, 1\]"),
        ({"log_loss": True, "loss_form": "negative"}, ValueError, r"log_loss=True means loss_form='negative_log'"),
        ({"classes": [1], "include_background": False}, ValueError, r"either classes= or include_background"),
    ],
)
def test_bad_parameters_raise_before_any_data(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        get_loss("dice", backend="numpy", **kwargs)


def _losses_with_classes_and_include_background(kind: str | None = None) -> list[str]:
    from segloss_core.registry import registry

    return [
        name
        for name in list_losses()
        if {"classes", "include_background"} <= {p.name for p in registry().loss(name).params}
        and (kind is None or (registry().loss(name).kind == "compound") == (kind == "compound"))
    ]


def test_every_loss_with_classes_and_include_background_is_covered():
    names = set(_losses_with_classes_and_include_background())
    assert {"dice", "focal", "generalized_dice", "lovasz_softmax", "boundary", "hausdorff_dt", "dice_ce"} <= names


@pytest.mark.parametrize("name", _losses_with_classes_and_include_background())
def test_classes_alone_selects_the_channels(name):
    """classes= overrides include_background's default, True (dice) or False (boundary, hausdorff_dt)."""
    plan = get_loss(name, backend="numpy", classes=[1]).plan
    assert all(term.params.classes == (1,) for term in plan.terms if "classes" in term.params)


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("name", _losses_with_classes_and_include_background())
def test_classes_with_an_explicit_include_background_is_refused_before_any_kernel(
    name, include_background, monkeypatch
):
    """Both given is the mistake, whatever the values (classes lists the channels; it would override the other)."""
    from segloss_core.registry import Registry

    def build(*args, **kwargs):
        raise AssertionError("the backend was asked to build a loss")

    monkeypatch.setattr(Registry, "build", build)
    with pytest.raises(ValueError, match=r"give either classes= or include_background=, not both \(classes=\(1,\)"):
        get_loss(name, backend="torch", classes=[1], include_background=include_background)


@pytest.mark.parametrize(("name", "preset"), [("dice", "nnunet"), ("boundary", "kervadec2019"), ("dice_ce", "nnunet")])
def test_a_presets_include_background_gives_way_to_classes(name, preset):
    """A preset's include_background=False is the preset's choice, not the caller's: classes= overrides it."""
    plan = get_loss(name, backend="numpy", preset=preset, classes=[2]).plan
    selected = [term.params for term in plan.terms if "classes" in term.params]
    assert selected and all(p.classes == (2,) and p.include_background is False for p in selected)


def test_explicit_parameters_are_the_callers_and_survive_pickling():
    import pickle

    from segloss_core import compound

    plan = get_loss("dice_ce", backend="numpy", preset="nnunet", smooth_nr=0.5).plan
    assert [term.params.explicit for term in plan.terms] == [{"smooth_nr"}, set()]
    assert [term.params.explicit for term in pickle.loads(pickle.dumps(plan)).terms] == [{"smooth_nr"}, set()]
    with pytest.raises(ValueError, match=r"loss 'dice': give either classes= or include_background="):
        compound([("dice", 1.0, {"preset": "nnunet", "classes": [1], "include_background": False})], backend="numpy")


def test_parameter_values_are_canonicalised():
    loss = get_loss("dice", backend="numpy", class_weights=np.array([1, 2, 3]), smooth_nr=1)
    params = loss.plan.terms[0].params
    assert params.class_weights == (1.0, 2.0, 3.0)
    assert isinstance(params.smooth_nr, float)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match=r"no preset 'nnUnet' \(did you mean 'nnunet'\?\); presets: monai, nnunet"):
        get_loss("dice", backend="numpy", preset="nnUnet")


def test_preset_then_overrides():
    params = get_loss("dice", backend="numpy", preset="nnunet", batch=True).plan.terms[0].params
    assert (params.include_background, params.smooth_nr, params.clamp_dr, params.loss_form, params.batch) == (
        False,
        1e-5,
        1e-8,
        "negative",
        True,
    )
    assert params.preset == "nnunet"


def test_param_definition_errors():
    with pytest.raises(ValueError, match="kind must be one of"):
        Param("x", "complex", 1.0, "doc")
    with pytest.raises(ValueError, match="needs choices"):
        Param("x", "choice", "a", "doc")


@pytest.mark.parametrize("name", ["dice", "dice_ce", "cross_entropy", "generalized_dice", "tversky"])
def test_describe_lists_everything(name):
    info = describe(name)
    text = str(info)
    for param in info.parameters:
        assert param.name in text and param.meaning in text
    for preset in info.presets:
        assert preset.name in text and preset.source in text
    assert "Formula:" in text and "Backends:" in text and "numpy: available" in text
    assert info.backends["numpy"] == "available"


def test_every_loss_has_formula_summary_and_documented_params():
    for name in list_losses():
        info = describe(name)
        assert info.summary and info.formula
        for p in info.parameters:
            assert p.meaning, (name, p.name)
