"""The ``segloss`` command line."""

from __future__ import annotations

import os
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
    rows = {tuple(line.split()[:2]): line.split()[2] for line in out.splitlines() if line.startswith("dice ")}
    assert rows[("dice", "numpy")] == "reference"
    assert rows[("dice", "torch")] in {"fused", "native"}  # which implementation ran is shown


def test_demo_runs_every_available_backend(capsys, monkeypatch):
    """A third-party backend (here a throwaway one, registered through the plugin manager) gets rows."""
    from segloss_core import hookimpl, plugin_manager
    from segloss_core.numpy_backend import NumpyBackend

    class ThirdParty(NumpyBackend):
        name = "thirdparty"
        description = "a throwaway backend"

    class Plugin:
        @hookimpl
        def segloss_register_backends(self, register):
            register(ThirdParty())

    plugin = Plugin()
    plugin_manager().register(plugin, name="thirdparty-demo")
    try:
        assert main(["demo", "--size", "12", "--repeat", "1"]) == 0
    finally:
        plugin_manager().unregister(plugin)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    third = {row[0]: row for row in rows if len(row) > 1 and row[1] == "thirdparty"}
    assert "dice" in third and third["dice"][5] == "-"  # value and gradient in one call: no forward column
    assert third["dice"][2] == "hook"  # run through its conformance hook
    assert float(third["dice"][4]) == 0.0  # the reference math again (float32 logits are exact in float64)


def test_check_numpy_quick(capsys):
    assert main(["check", "numpy", "--loss", "dice", "--quick"]) == 0
    assert "0 failed" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--version"], ["list"]])
def test_console_script_runs(args):
    result = subprocess.run([sys.executable, "-m", "segloss_core.cli", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_check_with_a_backend_option(capsys):
    pytest.importorskip("torch")
    assert main(["check", "torch", "--loss", "dice", "--quick", "--dtype", "float64", "--option", "impl=native"]) == 0
    assert "with {'impl': 'native'}" in capsys.readouterr().out


def test_build_reports_what_was_built(capsys):
    pytest.importorskip("torch")
    from segloss_torch import build

    code = main(["build", "torch"])
    out = capsys.readouterr().out
    if build.status().loaded:
        assert code == 0 and "torch: fused kernels built for CPU" in out
    else:
        assert code == 1 and "torch: fused kernels NOT built" in out


FAILED_BUILD = r"""
import warnings
import torch
from segloss_core import describe, get_loss
from segloss_core.cli import main
from segloss_torch.build import FusedBuildWarning

x = torch.randn(2, 3, 5, 4, 3, dtype=torch.float64, requires_grad=True)
y = torch.randint(0, 3, (2, 5, 4, 3))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = get_loss("dice_ce", backend="torch")(x, y)
    second = get_loss("dice", backend="torch")(x, y)
ours = [w for w in caught if issubclass(w.category, FusedBuildWarning)]
assert len(ours) == 1, [str(w.message) for w in caught]
assert "could not be built" in str(ours[0].message) and "using the native" in str(ours[0].message)
print("WARNING:", ours[0].message)
native = get_loss("dice_ce", backend="torch", impl="native")(x, y)
assert torch.equal(first, native)
assert "native" in describe("dice").backends["torch"]
assert main(["build", "torch"]) == 1
"""


def test_failed_build_warns_once_with_the_reason_and_uses_native(tmp_path):
    """A broken compiler: one FusedBuildWarning naming the error, native results, `segloss build` exits 1."""
    pytest.importorskip("torch")
    import os

    fake = tmp_path / "broken-cxx"
    fake.write_text("#!/bin/sh\necho 'broken-cxx: this compiler refuses to compile' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "CXX": str(fake), "SEGLOSS_BUILD_DIR": str(tmp_path / "build")}
    result = subprocess.run([sys.executable, "-c", FAILED_BUILD], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING: segloss: the fused C++/CUDA kernels could not be built" in result.stdout
    assert "fused kernels NOT built" in result.stdout


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            "explain",
            ("Print what one loss configuration computes", "segloss explain dice --preset nnunet", "NAME=VALUE"),
        ),
        ("build", ("instead of on the first loss call", "Exit status 1", "SEGLOSS_BUILD_DIR", "SEGLOSS_NO_BUILD")),
        ("distmap", ("default: 1 with the segloss engine", "CPU count with scipy")),
    ],
)
def test_subcommand_help_says_what_it_does(capsys, command, expected):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in expected:
        assert text in out, f"`segloss {command} --help` lacks {text!r}"


# every subcommand, with arguments that make it print at least one line quickly
_QUICK_ARGS = {
    "list": ["list"],
    "describe": ["describe", "dice"],
    "explain": ["explain", "dice", "--preset", "nnunet"],
    "backends": ["backends"],
    "demo": ["demo", "--size", "6", "--repeat", "1"],
    "build": ["build", "no-such-backend"],
    "check": ["check", "numpy", "--loss", "dice", "--quick", "--dtype", "float64"],
    "distmap": ["distmap", "--quiet", "--num-classes", "2", "--workers", "1", "--engine", "scipy"],
}


def _subcommands() -> set[str]:
    import argparse

    from segloss_core.cli import build_parser

    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(action.choices)


def test_a_closed_stdout_ends_every_subcommand_quietly(tmp_path, monkeypatch, capfd):
    """`segloss ... | head -1`: the reader has gone, the write fails with EPIPE; exit 141, no traceback."""
    import numpy as np

    from segloss_core.cli import EXIT_BROKEN_PIPE

    assert set(_QUICK_ARGS) == _subcommands()  # a new subcommand needs a line here
    np.save(tmp_path / "a.npy", np.array([[0, 1], [1, 0]]))
    for name, args in _QUICK_ARGS.items():
        if name == "distmap":
            args = [*args, str(tmp_path / "a.npy"), "--out", str(tmp_path / "out")]
        read_end, write_end = os.pipe()
        os.close(read_end)  # a real pipe whose reader has already gone
        stream = open(write_end, "w", buffering=1)  # noqa: SIM115 - closed below
        monkeypatch.setattr(sys, "stdout", stream)
        try:
            code = main(args)
        finally:
            monkeypatch.undo()
            stream.close()  # main() pointed the descriptor at os.devnull: closing flushes nothing into the pipe
        assert code == EXIT_BROKEN_PIPE, name
    assert "Traceback" not in capfd.readouterr().err


def test_a_pipe_to_head_ends_quietly():
    """The console script through a shell pipe: the first line arrives, no traceback, exit 0 or 141."""
    command = f"{sys.executable} -m segloss_core.cli explain dice --preset nnunet | head -1; exit ${{PIPESTATUS[0]}}"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    assert result.stdout.count("\n") == 1 and result.stdout.strip()
    assert result.returncode in (0, 141) and result.stderr == "", result.stderr
