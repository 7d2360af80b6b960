"""The ``segloss`` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from segloss_core.cli import main


def test_list(capsys):
    assert main(["list", "--presets"]) == 0
    out = capsys.readouterr().out
    assert "dice " in out and "presets: monai, nnunet" in out and "dice_ce" in out


def test_describe(capsys):
    assert main(["describe", "dice"]) == 0
    out = capsys.readouterr().out
    assert "smooth_nr" in out and "nnunet:" in out and "MIC-DKFZ/nnUNet" in out and "Backends:" in out


def test_describe_unknown_is_a_clean_error(capsys):
    assert main(["describe", "dise"]) == 2
    assert "did you mean 'dice'" in capsys.readouterr().err


def test_backends(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out and "torch" in out and "available" in out
    assert "cupy" in out  # listed, with the reason it cannot run, where it cannot


def test_demo_small(capsys):
    assert main(["demo", "--size", "16", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "dice_ce" in out and "torch" in out and "numpy" in out and "|Δ ref|" in out


def test_check_numpy_quick(capsys):
    assert main(["check", "numpy", "--loss", "dice", "--quick"]) == 0
    assert "0 failed" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--version"], ["list"]])
def test_console_script_runs(args):
    result = subprocess.run([sys.executable, "-m", "segloss_core.cli", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
