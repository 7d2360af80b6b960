"""Collecting the tests compiles nothing: kernels are built when the first test that needs them runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_collection_never_compiles_the_extension(tmp_path):
    build = tmp_path / "build"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env["SEGLOSS_BUILD_DIR"] = str(build)
    # everything but the conformance matrix (thousands of cases, no kernels involved at collection)
    skip = ["--ignore=tests/plugins/test_conformance.py"]
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests", *skip]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "tests collected" in result.stdout
    assert not build.exists(), sorted(str(p.relative_to(build)) for p in build.rglob("*"))[:10]
