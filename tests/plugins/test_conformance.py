"""The conformance suite, run on every installed backend, and shown to catch planted bugs."""

from __future__ import annotations

import numpy as np
import pytest

from segloss_core import Backend, hookimpl, list_backends, plugin_manager
from segloss_core.conformance import Case, check_backend, check_case
from segloss_core.conformance.check import conformance_matrix
from segloss_core.numpy_backend import NumpyBackend, NumpyLoss

# the backends of this distribution (an installed third-party backend certifies itself with
# `pytest --pyargs segloss_core.conformance --segloss-backend NAME`)
AVAILABLE = [b.name for b in list_backends() if b.available and b.plugin in {"numpy", "torch", "cupy"}]
# impl='auto' picks the fused kernels where they built (as in CI): the autograd path is certified too
RUNS = [(name, {}) for name in AVAILABLE] + ([("torch", {"impl": "native"})] if "torch" in AVAILABLE else [])


QUICK_DTYPE = "float32"  # `-m "not slow"` runs the quick kit in this dtype (the full run: every case and dtype)


def _run_id(backend: str, options: dict) -> str:
    return "-".join([backend, *(str(v) for v in options.values())])


def _matrix() -> list:
    """One pytest case per (backend run, loss case, dtype); all but the quick kit in float32 are slow."""
    params = []
    for backend, options in RUNS:
        quick = {(c.id, d) for _, c, d in conformance_matrix([backend], dtypes=[QUICK_DTYPE], quick=True)}
        for _, case, dtype in conformance_matrix([backend]):
            marks = () if (case.id, dtype) in quick else (pytest.mark.slow,)
            run = _run_id(backend, options)
            params.append(pytest.param(backend, options, case, dtype, marks=marks, id=f"{run}-{dtype}-{case.id}"))
    return params


MATRIX = _matrix()


@pytest.mark.parametrize(("backend", "options", "case", "dtype"), MATRIX)
def test_backend_conforms(backend, options, case, dtype):
    outcome = check_case(backend, case, dtype, options)
    if outcome.status == "skip":
        pytest.skip(outcome.detail)
    assert outcome.status == "pass", f"{outcome}\nreproduce:\n{case.reproducer(backend, dtype, options)}"


@pytest.mark.parametrize(("backend", "options"), RUNS, ids=[_run_id(b, o) for b, o in RUNS])
def test_the_matrix_covers_every_loss_and_dtype(backend, options):
    rows = [p.values for p in MATRIX if p.values[0] == backend and p.values[1] == options]
    assert len(rows) > 500
    assert {case.loss for _, _, case, _ in rows} >= {"dice", "cross_entropy", "boundary", "dice_ce"}
    if backend == "torch":
        assert {dtype for *_, dtype in rows} == {"float64", "float32", "float16", "bfloat16"}


class _Planted(NumpyLoss):
    def __init__(self, plan, bug):
        super().__init__(plan)
        self.bug = bug

    def __call__(self, pred, target, mask=None, **inputs):
        if self.bug == "ignore" and self.plan.ignore_index is not None and target.dtype.kind in "iu":
            target = np.where(target == self.plan.ignore_index, 0, target)  # forgets the ignore label
            self.plan = self.plan  # same plan; labels no longer contain it
        value = super().__call__(pred, target, mask, **inputs)
        return value * 1.001 if self.bug == "value" else value

    def value_and_grad(self, pred, target, mask=None, grad_output=None, **inputs):
        if self.bug == "ignore" and self.plan.ignore_index is not None and target.dtype.kind in "iu":
            target = np.where(target == self.plan.ignore_index, 0, target)
        value, grad = super().value_and_grad(pred, target, mask, grad_output, **inputs)
        if self.bug == "value":
            value = value * 1.001
        if self.bug == "gradient":
            grad = grad.copy()
            grad.reshape(-1)[0] += 1e-3
        return value, grad


def _planted_backend(bug):
    class PlantedBackend(NumpyBackend):
        name = f"planted-{bug}"

        def build(self, plan, **options):
            return _Planted(plan, bug)

    class Plugin:
        @hookimpl
        def segloss_register_backends(self, register):
            register(PlantedBackend())

    return Plugin()


@pytest.mark.parametrize("bug", ["value", "gradient", "ignore"])
def test_planted_bug_is_caught_and_reported(bug):
    pm = plugin_manager()
    pm.register(_planted_backend(bug), name=f"planted-{bug}")
    try:
        report = check_backend(f"planted-{bug}", losses=["dice"], quick=True)
    finally:
        pm.unregister(name=f"planted-{bug}")
    assert not report.ok
    kinds = {f.what for f in report.failures}
    expected = {"value": {"value"}, "gradient": {"gradient"}, "ignore": {"value", "gradient"}}[bug]
    assert kinds <= expected and kinds
    if bug == "ignore":
        assert all("ignore" in f.case.kind for f in report.failures)
    text = str(report)
    assert "reproduce:" in text and "check_case(" in text and "max abs error" in text


def test_reproducer_runs():
    case = Case("dice", "nnunet", {"activation": "softmax"}, "3d-softmax", seed=0)
    outcome = check_case("numpy", case, "float64")
    assert outcome.status == "pass"
    namespace: dict = {}
    exec(case.reproducer("numpy", "float64"), namespace)


def test_backend_errors_are_failures_not_crashes():
    class Broken(Backend):
        name = "raises"

        def build(self, plan, **options):
            raise RuntimeError("kernel exploded")

        def run_for_conformance(self, *args, **kwargs):  # pragma: no cover
            raise AssertionError

    class Plugin:
        @hookimpl
        def segloss_register_backends(self, register):
            register(Broken())

    pm = plugin_manager()
    pm.register(Plugin(), name="raises")
    try:
        report = check_backend("raises", losses=["dice"], quick=True)
    finally:
        pm.unregister(name="raises")
    assert report.failures and all(f.what == "error" and "kernel exploded" in f.detail for f in report.failures)
