"""The conformance suite, run on every installed backend, and shown to catch planted bugs."""

from __future__ import annotations

import numpy as np
import pytest

from segloss_core import Backend, hookimpl, list_backends, plugin_manager
from segloss_core.conformance import Case, check_backend, check_case
from segloss_core.numpy_backend import NumpyBackend, NumpyLoss

# the backends of this distribution (an installed third-party backend certifies itself with
# `pytest --pyargs segloss_core.conformance --segloss-backend NAME`)
AVAILABLE = [b.name for b in list_backends() if b.available and b.plugin in {"numpy", "torch", "cupy"}]


@pytest.mark.parametrize("backend", AVAILABLE)
def test_backend_conforms(backend):
    report = check_backend(backend)
    assert report.ok, str(report)
    assert len([o for o in report.outcomes if o.status == "pass"]) > 500


@pytest.mark.skipif("torch" not in AVAILABLE, reason="torch backend not available")
def test_torch_native_implementation_conforms():
    """impl='auto' picks the fused kernels where they built (as in CI): certify the autograd path too."""
    report = check_backend("torch", options={"impl": "native"})
    assert report.ok, str(report)
    assert len([o for o in report.outcomes if o.status == "pass"]) > 500
    assert {o.dtype for o in report.outcomes} == {"float64", "float32", "float16", "bfloat16"}


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
