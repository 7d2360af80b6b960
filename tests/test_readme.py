"""The README's two set-up commands exist and CI runs the test one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [c.strip() for c in re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)]


def test_readme_has_demo_and_test_commands():
    commands = _commands()
    assert any(c.endswith("segloss demo") for c in commands)
    assert any("pytest" in c for c in commands)
    for command in commands:
        assert "pip install torch==2.13.0" in command


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in _commands() if "pytest" in c)
    pytest_part = test_command.split("&&")[-1].strip()
    install_part = test_command.split("&&")[-2].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert pytest_part in ci
    assert install_part.replace("pip install", "python -m pip install -q") in ci
