"""``explain`` and docs/conventions.md (regenerated here: the file cannot go stale)."""

from __future__ import annotations

from pathlib import Path

import pytest

from segloss_core.cli import main
from segloss_core.explain import explain, render_conventions

ROOT = Path(__file__).resolve().parents[2]


def test_conventions_file_is_current():
    expected = render_conventions()
    current = (ROOT / "docs" / "conventions.md").read_text()
    assert current == expected, (
        "docs/conventions.md is stale: run python -m segloss_core.explain --write docs/conventions.md"
    )


def test_explain_nnunet_formula_has_every_constant():
    ex = explain("dice", "nnunet")
    assert "−(2·I + 1e-05) / (max(P + G + 1e-05, 1e-08))" in ex.formula
    assert "background excluded" in ex.formula and "per sample" in ex.formula
    names = [c.name for c in ex.cases]
    assert names == [
        "empty target, empty prediction",
        "empty target, 27 false-positive voxels",
        "1-voxel lesion predicted at p = 0.01",
        "1-voxel lesion predicted at p = 0.5",
        "1-voxel lesion predicted at p = 0.99",
        "all voxels ignored",
    ]
    ignored = ex.cases[-1]
    assert ignored.value == -1.0 and ignored.grad_max == 0.0
    lesion = [c.lesion_grad for c in ex.cases if c.lesion_grad is not None]
    assert all(g < 0 for g in lesion)  # the lesion logit is always pushed up


def test_explain_matches_hand_value_for_monai():
    # empty target, p_fg = 0.01 on 512 voxels, 2 softmax classes, per sample, background included
    case = explain("dice", "monai").cases[0]
    bg = (2 * 512 * 0.99 + 1e-5) / (512 * 0.99 + 512 + 1e-5)
    fg = 1e-5 / (512 * 0.01 + 1e-5)
    assert case.value == pytest.approx(1 - (bg + fg) / 2, rel=1e-12)


@pytest.mark.parametrize("loss", ["jaccard", "tversky", "focal_tversky", "generalized_dice", "dice_ce", "focal"])
def test_explain_other_losses(loss):
    ex = explain(loss)
    assert ex.formula and len(ex.cases) == 6


def test_cli_explain(capsys):
    assert main(["explain", "dice", "--preset", "smp", "--param", "batch=False", "--param", "activation=softmax"]) == 0
    out = capsys.readouterr().out
    assert "per sample" in out and "1-voxel lesion" in out
