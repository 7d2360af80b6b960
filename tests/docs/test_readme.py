"""The README's two set-up commands exist and CI runs the test one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [c.strip() for c in re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)]


def test_readme_has_demo_and_test_commands():
    commands = _commands()
    assert any(c.endswith("segloss demo") for c in commands)
    assert any("pytest" in c for c in commands)
    for command in commands:
        assert "pip install torch==2.13.0" in command


def _ci_parts(command: str) -> list[str]:
    """The README command's parts as .ci/run writes them (``pip`` quietly, through the venv's python)."""
    return [part.strip().replace("pip install", "python -m pip install -q") for part in command.split("&&")]


def test_ci_runs_the_readme_test_command():
    """.ci/run runs the README's test command part by part, in order, and installs nothing else into the
    test environment: a dependency the tests need goes into tests/install.sh, so the README has it too."""
    test_command = next(c for c in _commands() if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [line.strip() for line in ci.splitlines()]
    position = -1
    for part in _ci_parts(test_command):
        assert part in lines[position + 1 :], f".ci/run does not run {part!r} (in order) of the README's test command"
        position = lines.index(part, position + 1)
    before_tests = lines[: lines.index(_ci_parts(test_command)[-1])]
    own_installs = [
        line
        for line in before_tests
        if line.startswith("python -m pip install")
        and line not in _ci_parts(test_command)
        and line != "python -m pip install -q --upgrade pip"
    ]
    assert not own_installs, (
        f"install these in tests/install.sh (the README's test command), not .ci/run: {own_installs}"
    )


def test_install_script_installs_what_the_tests_use():
    script = (ROOT / "tests" / "install.sh").read_text()
    for needed in ('-e ".[torch,test]"', "segloss-cldice", "segloss-jax", "nnunetv2", "nvidia-cuda-nvrtc"):
        assert needed in script, needed
