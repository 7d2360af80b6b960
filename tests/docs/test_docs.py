"""docs/plugins.md cannot rot: every fenced code block in it is run or checked here.

The ``>>>`` examples run as a doctest (``--doctest-glob=*.md`` in pyproject.toml). This module
takes the fenced blocks: ``python`` scripts are executed, ``bash`` commands are run from the
repository root (``pip install PATH`` is checked, not run: it must name a distribution that is
installed here), and a block marked ``<!-- file: PATH -->`` must be an excerpt of that file
(TOML: a sub-table of it; anything else: its lines, in order). A block marked
``<!-- requires: a, b -->`` runs only where those modules are importable, one marked ``slow``
only with ``SEGLOSS_DOCS_SLOW=1``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "plugins.md"
FENCE = re.compile(r"(?:<!--(?P<meta>[^>]*)-->\n)?```(?P<lang>\w*)\n(?P<body>.*?)^```$", re.S | re.M)
LANGUAGES = ("python", "bash", "toml")


@dataclass(frozen=True)
class Block:
    lang: str
    body: str
    line: int
    requires: tuple[str, ...] = ()
    slow: bool = False
    file: str | None = None
    extra: tuple[str, ...] = field(default=())

    @property
    def id(self) -> str:
        return f"{self.lang}-line{self.line}"


def parse_blocks(text: str) -> list[Block]:
    out = []
    for match in FENCE.finditer(text):
        requires: list[str] = []
        slow = False
        file = None
        extra = []
        for item in (match["meta"] or "").split(";"):
            key, _, value = item.strip().partition(":")
            if key == "requires":
                requires += [v.strip() for v in value.split(",") if v.strip()]
            elif key == "slow":
                slow = True
            elif key == "file":
                file = value.strip()
            elif key:
                extra.append(key)
        line = text.count("\n", 0, match.start("body"))
        out.append(Block(match["lang"], match["body"], line, tuple(requires), slow, file, tuple(extra)))
    return out


BLOCKS = parse_blocks(DOC.read_text())


def _skip_reason(block: Block) -> str | None:
    missing = [m for m in block.requires if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs {', '.join(missing)}"
    if block.slow and os.environ.get("SEGLOSS_DOCS_SLOW") != "1":
        return "slow block: set SEGLOSS_DOCS_SLOW=1"
    return None


def _is_subset(part: Any, whole: Any) -> bool:
    if isinstance(part, dict):
        return isinstance(whole, dict) and all(k in whole and _is_subset(v, whole[k]) for k, v in part.items())
    return part == whole


def test_blocks_are_understood():
    """Every fenced block has a language this module runs and only known markers."""
    assert len(BLOCKS) >= 6
    for block in BLOCKS:
        assert block.lang in LANGUAGES, f"{DOC.name}:{block.line}: a ```{block.lang} block is not run by any test"
        assert not block.extra, f"{DOC.name}:{block.line}: unknown markers {block.extra}"
        if block.lang == "toml":
            assert block.file, f"{DOC.name}:{block.line}: a TOML block must quote a file (<!-- file: PATH -->)"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _check_pip_install(words: list[str]) -> None:
    paths = [w for w in words[2:] if not w.startswith("-")]
    assert paths, words
    for path in paths:
        project = ROOT / path / "pyproject.toml"
        assert project.is_file(), f"pip install {path}: no pyproject.toml there"
        name = tomllib.loads(project.read_text())["project"]["name"]
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name} ({path}) is not installed in this environment")


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block(block: Block):
    reason = _skip_reason(block)
    if reason:
        pytest.skip(reason)
    if block.file:
        quoted = ROOT / block.file
        assert quoted.is_file(), f"{DOC.name}:{block.line}: quotes {block.file}, which does not exist"
        if block.lang == "toml":
            assert _is_subset(tomllib.loads(block.body), tomllib.loads(quoted.read_text())), (
                f"{DOC.name}:{block.line}: the TOML differs from {block.file}"
            )
        else:
            source = iter(quoted.read_text().splitlines())
            for line in filter(str.strip, block.body.splitlines()):
                assert any(line == candidate for candidate in source), (
                    f"{DOC.name}:{block.line}: {line!r} is not in {block.file} (in this order)"
                )
        return
    if block.lang == "python":
        exec(compile(block.body, f"{DOC.name}:{block.line}", "exec"), {"__name__": "docs_block"})
    elif block.lang == "bash":
        for command in filter(str.strip, block.body.splitlines()):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                _check_pip_install(words)
                continue
            result = subprocess.run(
                command, shell=True, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1800
            )
            assert result.returncode == 0, (
                f"{DOC.name}:{block.line}: `{command}` exited {result.returncode}\n{result.stdout[-3000:]}\n"
                f"{result.stderr[-3000:]}"
            )
