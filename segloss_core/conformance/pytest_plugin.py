"""pytest plugin of the conformance kit (entry point pytest11 "segloss"): adds --segloss-backend and
friends, used by ``pytest --pyargs segloss_core.conformance --segloss-backend NAME``."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("segloss", "segloss conformance kit")
    group.addoption("--segloss-backend", action="append", default=[], help="backend to certify (repeatable)")
    group.addoption("--segloss-loss", action="append", default=[], help="only these losses (repeatable)")
    group.addoption("--segloss-dtype", action="append", default=[], help="only these dtypes (repeatable)")
    group.addoption("--segloss-quick", action="store_true", help="fewer cases")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "conformance_case" not in metafunc.fixturenames:
        return
    from segloss_core.conformance.check import conformance_matrix

    config = metafunc.config
    backends = config.getoption("--segloss-backend")
    rows = conformance_matrix(
        backends,
        losses=config.getoption("--segloss-loss") or None,
        dtypes=config.getoption("--segloss-dtype") or None,
        quick=config.getoption("--segloss-quick"),
    )
    metafunc.parametrize("conformance_case", rows, ids=[f"{b}-{d}-{c.id}" for b, c, d in rows])
