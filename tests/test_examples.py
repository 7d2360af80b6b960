"""The examples run (tiny configurations, so they cannot rot)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_small_lesions_example_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "small_lesions.py"), "--steps", "4", "--every", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "lesion Dice: final" in result.stdout
    assert result.stdout.count("lesion Dice") == 6
