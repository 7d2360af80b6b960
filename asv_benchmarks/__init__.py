"""The segloss asv suite: see docs/benchmarks.md and common.py."""
