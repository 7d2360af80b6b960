"""The conformance kit as pytest tests, one per (backend, dtype, case); see docs/plugins.md.

    pytest --pyargs segloss_core.conformance --segloss-backend mybackend [--segloss-quick]

Without ``--segloss-backend`` there is nothing to certify and the module is skipped.
"""

from __future__ import annotations

import pytest


def test_case(conformance_case, request):
    from segloss_core.conformance import check_case

    if not request.config.getoption("--segloss-backend", default=None):
        pytest.skip("no --segloss-backend given")
    backend, case, dtype = conformance_case
    outcome = check_case(backend, case, dtype)
    if outcome.status == "skip":
        pytest.skip(outcome.detail)
    assert outcome.status == "pass", f"{outcome}\nreproduce:\n{case.reproducer(backend, dtype)}"
