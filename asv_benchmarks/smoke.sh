#!/usr/bin/env bash
# CI smoke of the asv suite: every benchmark imports and has valid signatures (asv check), and
# runs once (asv run --quick) in the current environment (--python=same: the active venv, with
# segloss installed in it). Nothing is saved (--dry-run). Exits non-zero if any benchmark fails;
# skipped combinations (n/a: no GPU, no such peer loss, size cap) are fine. Then the memory gate
# (asv_benchmarks/memory_gate.py) fails it when an implementation exceeds its memory bound.
#
#   asv_benchmarks/smoke.sh            # every class and parameter, except the 128³ sizes (~2 min)
#   asv_benchmarks/smoke.sh --full     # the whole suite, 128³ included (~5-6 min on 2 cores)
#   asv_benchmarks/smoke.sh --bench CPU   # other arguments go to `asv run` instead of the filter
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# every benchmark whose parameters do not name a 128³ size (LossDtype* are 1×4×128³ by design)
filter=(--bench "^(?!.*(1x14x128x128x128|'128x128x128')).*$")
if [ "${1:-}" = "--full" ]; then
  filter=()
  shift
elif [ "$#" -gt 0 ]; then
  filter=()
fi

asv machine --yes > /dev/null || exit 1  # record the machine once, so that asv never prompts (CI has no stdin)
# the fused extension first (JIT, ~1 min the first time): the suite's setup_cache would build it
# too, but built now it is loaded once by asv's forkserver instead of once per benchmark process
segloss build 2>&1 | tail -1

asv check --python=same || { echo "== asv check failed"; exit 1; }

asv run --quick --python=same --show-stderr --dry-run "${filter[@]}" "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}  # asv run exits 2 when a benchmark failed
# belt and braces: a failed benchmark or parameter combination ends its line with "failed"
if grep -Eq "[[:space:]]failed[[:space:]]*$|setup_cache failed|Importing benchmark suite failed" "$log"; then
  echo "== asv smoke: failures:"
  grep -E "[[:space:]]failed[[:space:]]*$|setup_cache failed|Importing benchmark suite failed" "$log" | head -20
  [ "$status" -ne 0 ] || status=1
fi
# the memory gate: every segloss implementation's extra peak memory within its documented bound
# (docs/benchmarks.md, "Memory bounds"); memory is deterministic, time is never gated
python -m asv_benchmarks.memory_gate || status=1
echo "== asv smoke finished in $(( $(date +%s) - start ))s (status $status)"
exit "$status"
