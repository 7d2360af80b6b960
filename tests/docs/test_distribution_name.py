"""The distribution's name on the package index, and every install hint that names it.

``segloss`` on the package index is an unrelated project (0.0.1, "Active Boundary Loss, Boundary
Loss, ..."), so a hint such as ``pip install 'segloss[torch]'`` would install someone else's code.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import tomllib

from segloss_core.plugins import DISTRIBUTION

ROOT = Path(__file__).resolve().parents[2]
SCANNED = (".py", ".md", ".toml", ".sh", ".txt", ".cfg", ".json")
# `segloss[extra]`, `segloss>=1`, `segloss==1` and `pip install segloss` name the wrong project
WRONG_HINT = re.compile(r"(?<![\w.-])segloss(\[|[<>=~!]=?\d)|pip install\s+['\"]?segloss(?![\w-])")


def _normalized(name: str) -> str:
    """A distribution name as the package index compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _tracked_text_files() -> list[Path]:
    """The repository's own text files: git's tracked and untracked-but-not-ignored files (build and
    install leftovers such as *.egg-info are ignored), or every file outside such folders elsewhere."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        paths = [ROOT / name for name in listed]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist)
        skip = {".git", ".venv", "build", "dist", ".build", ".hypothesis"}
        paths = [p for p in ROOT.rglob("*") if not (skip & set(p.relative_to(ROOT).parts))]
        paths = [p for p in paths if not any(part.endswith(".egg-info") for part in p.parts)]
    return [p for p in paths if p.is_file() and p.suffix in SCANNED]


def test_distribution_name_is_the_constant():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _normalized(project["name"]) == DISTRIBUTION == "segloss-registry"


def test_example_plugins_depend_on_this_distribution():
    for path in (ROOT / "plugins" / "examples").glob("*/pyproject.toml"):
        deps = tomllib.loads(path.read_text())["project"]["dependencies"]
        names = [_normalized(re.split(r"[<>=~!\[; ]", d, maxsplit=1)[0]) for d in deps]
        assert DISTRIBUTION in names, f"{path.relative_to(ROOT)}: {deps}"
        assert "segloss" not in names, f"{path.relative_to(ROOT)} depends on the unrelated 'segloss'"


def test_no_install_hint_names_the_unrelated_project():
    offenders = []
    for path in _tracked_text_files():
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if WRONG_HINT.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "install hints naming 'segloss' (an unrelated project):\n" + "\n".join(offenders)


def test_wrong_hint_pattern():
    wrong = ("pip install 'segloss[torch]'", "segloss>=0.1", "pip install segloss", 'dependencies = ["segloss==0.1"]')
    right = ("pip install 'segloss-registry[torch]'", "segloss-registry>=0.1", "segloss list", "import segloss_core")
    assert all(WRONG_HINT.search(text) for text in wrong)
    assert not any(WRONG_HINT.search(text) for text in right)
