"""The memory gate (asv_benchmarks/memory_gate.py): its bounds are the table docs/benchmarks.md
states, and a ratio above its bound fails it (the measurement itself runs in CI's asv smoke)."""

from __future__ import annotations

import re
from pathlib import Path

from asv_benchmarks.memory_gate import BOUNDS, verdicts

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def _documented_bounds() -> dict[tuple[str, str, str], float]:
    text = DOCS.read_text()
    section = text.split("## Memory bounds", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| `([\w-]+)` \| (\w+) \| ([\d.]+)× \|", section, flags=re.M)
    return {(loss, impl, dtype): float(bound) for loss, impl, dtype, bound in rows}


def test_the_docs_state_the_gated_bounds():
    assert _documented_bounds() == BOUNDS


def test_a_ratio_over_its_bound_fails_and_na_passes():
    key = next(iter(BOUNDS))
    lines, ok = verdicts({key: BOUNDS[key] + 0.01})
    assert not ok and "OVER" in lines[0]
    lines, ok = verdicts({key: BOUNDS[key]})
    assert ok and "n/a" in lines[1]
