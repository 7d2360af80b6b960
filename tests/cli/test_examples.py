"""The examples run (tiny configurations, so they cannot rot)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_small_lesions_example_runs(tmp_path):
    figure = tmp_path / "curves.png"
    command = [sys.executable, str(ROOT / "examples" / "small_lesions.py"), "--steps", "4", "--every", "2"]
    plotting = importlib.util.find_spec("matplotlib") is not None
    result = subprocess.run(
        command + (["--plot", str(figure)] if plotting else []), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert "lesion Dice: final" in result.stdout
    assert result.stdout.count("lesion Dice") == 6
    if plotting:
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"saved {figure}" in result.stdout


def test_small_lesions_plot_without_matplotlib_fails_before_training(tmp_path):
    """--plot without matplotlib: a clear message at once, not after minutes of training."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "matplotlib.py").write_text("raise ImportError('matplotlib is blocked for this test')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    command = [sys.executable, str(ROOT / "examples" / "small_lesions.py"), "--plot", str(tmp_path / "x.png")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert "--plot needs matplotlib: pip install 'segloss-registry[plot]'" in result.stderr
    assert "lesion Dice" not in result.stdout


def test_small_lesions_help_is_whole():
    """--help gives the whole description (it used to stop mid-sentence) and every option's meaning."""
    command = [sys.executable, str(ROOT / "examples" / "small_lesions.py"), "--help"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "trained from the same initialisation on the same synthetic volumes, under several presets" in text
    assert "lesion Dice over training." in text
    for option in ("--steps", "--batch", "--seed", "--every", "--plot"):
        line = next(ln for ln in result.stdout.splitlines() if ln.strip().startswith(option))
        assert len(line.split()) > 2, f"{option} has no help text: {line!r}"


def test_patch_distance_maps_example_runs(tmp_path):
    """examples/patch_distance_maps.py --quick: the numbers docs/distance_maps.md quotes, on a small volume."""
    import json

    out = tmp_path / "patch.json"
    command = [sys.executable, str(ROOT / "examples" / "patch_distance_maps.py"), "--quick", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(out.read_text())
    assert numbers["patches"] == 20 and numbers["patches_that_differ"] > 0  # a patch's own map is not the crop
    assert numbers["absent_class_pairs"] > 0 and numbers["gradient_relative_error"] > 0.05
    assert 0 < numbers["present_class_mean_abs_error_mm"] < numbers["mean_abs_error_mm"]
    assert "whole-volume map" in result.stdout and "per patch" in result.stdout
