"""The memory gate: each segloss implementation's extra peak memory, as a multiple of the logits,
must stay within the bound docs/benchmarks.md states for it ("Memory bounds").

Runs the asv benchmark ``LossDtypeCPU.track_extra_peak`` (one training step of the loss alone,
1×4×128³ logits, int64 labels; the step's peak RSS above what was in use before it, ÷ the logits'
bytes) once for every row of :data:`BOUNDS` and exits 1 when any ratio exceeds its bound. Memory
is deterministic enough to gate (time is not: it is reported, never gated). CI runs it from
``asv_benchmarks/smoke.sh``::

    python -m asv_benchmarks.memory_gate          # all rows (~1 min on 2 idle cores)
"""

from __future__ import annotations

import sys

from .bench_losses import LossDtypeCPU

# (loss, implementation, logits dtype) -> the most extra peak memory allowed, × the logits' bytes
# (1.0 is the gradient itself). The same table is in docs/benchmarks.md (tests/test_memory_gate.py).
BOUNDS: dict[tuple[str, str, str], float] = {
    ("dice", "segloss-fused", "float32"): 1.1,
    ("dice_ce", "segloss-fused", "float32"): 1.1,
    ("dice_ce", "segloss-fused", "bfloat16"): 1.1,
    ("dice", "segloss-native", "float32"): 1.5,
    ("dice_ce", "segloss-native", "float32"): 1.5,
    ("dice", "segloss-native", "bfloat16"): 1.5,
    ("dice_ce", "segloss-native", "bfloat16"): 1.5,
}


def measure(loss: str, implementation: str, dtype: str, cache: dict) -> float | None:
    """The benchmark's value, or None where it does not apply here (asv's "n/a")."""
    bench = LossDtypeCPU()
    try:
        bench.setup(cache, loss, implementation, dtype)
    except NotImplementedError:
        return None
    return float(bench.track_extra_peak(cache, loss, implementation, dtype))


def verdicts(measured: dict[tuple[str, str, str], float | None]) -> tuple[list[str], bool]:
    """One line per row of :data:`BOUNDS` and whether every measured ratio is within its bound."""
    lines, ok = [], True
    for key, bound in BOUNDS.items():
        value = measured.get(key)
        if value is None:
            lines.append(f"{' '.join(key):40s}  n/a        bound {bound:.2f}")
            continue
        within = value <= bound
        ok &= within
        lines.append(f"{' '.join(key):40s}  {value:5.2f}×  {'ok  ' if within else 'OVER'}  bound {bound:.2f}")
    return lines, ok


def main() -> int:
    cache = LossDtypeCPU().setup_cache()
    measured = {key: measure(*key, cache) for key in BOUNDS}
    lines, ok = verdicts(measured)
    print("\n".join(["== memory gate: extra peak × logits, 1×4×128³ (docs/benchmarks.md)", *lines]))
    if not ok:
        print("== memory gate FAILED: an implementation allocates more than its documented bound")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
