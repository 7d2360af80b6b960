"""The conformance suite, run on every installed backend, and shown to catch planted bugs."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from segloss_core import Backend, hookimpl, list_backends, plugin_manager
from segloss_core.backend import ConformanceDtype
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
    """The NumPy backend with one deliberate bug (``bug``), for showing that the kit catches it."""

    def __init__(self, plan, bug):
        super().__init__(plan)
        self.bug = bug

    def _inputs(self, pred, target, mask):
        if self.bug == "ignore" and self.plan.ignore_index is not None and target.dtype.kind in "iu":
            target = np.where(target == self.plan.ignore_index, 0, target)  # forgets the ignore label
        c = pred.shape[1]
        if self.bug == "accepts-label-C" and c > 1 and target.dtype.kind in "iu" and (target == c).any():
            # no range check: the kernel reads out of bounds (as `index 4 is out of bounds` in torch)
            raise RuntimeError(f"index {pred.shape[1]} is out of bounds for dimension 1 with size {pred.shape[1]}")
        return pred, target, mask

    def _run(self, pred, target, mask, grad_output, inputs, with_grad):
        pred, target, mask = self._inputs(pred, target, mask)
        scale = None
        if self.bug == "mask-before-activation" and mask is not None:
            scale = np.broadcast_to(mask, pred.shape) if mask.shape[1] == pred.shape[1] else mask
            pred, mask = pred * scale, None  # the mask scales the logits instead of the voxel terms
        with _float16_sums(self.bug == "float16-sums" and pred.dtype == np.float16):
            if with_grad:
                value, grad = super().value_and_grad(pred, target, mask, grad_output, **inputs)
            else:
                value, grad = super().__call__(pred, target, mask, **inputs), None
        if scale is not None and grad is not None:
            grad = grad * scale
        if self.bug == "value":
            value = value * 1.001
        if grad is not None and (
            self.bug == "gradient" or (self.bug == "soft-target-gradient" and target.dtype.kind == "f")
        ):
            grad = grad.copy()
            grad.reshape(-1)[0] += 1e-3
        if self.bug == "nan-on-all-ignored" and self.plan.ignore_index is not None and target.dtype.kind in "iu":
            ignored = (target == self.plan.ignore_index).reshape(target.shape[0], -1)
            if ignored.all(axis=1).any():
                value = value * np.nan  # 0/0 on the classes of a sample with no valid voxel
        return value, grad

    def __call__(self, pred, target, mask=None, **inputs):
        return self._run(pred, target, mask, None, inputs, with_grad=False)[0]

    def value_and_grad(self, pred, target, mask=None, grad_output=None, **inputs):
        return self._run(pred, target, mask, grad_output, inputs, with_grad=True)


@contextlib.contextmanager
def _float16_sums(active):
    """The reference statistics, but each summed voxel by voxel in float16 (the bug: no float32
    accumulator); such a sum stalls at 2048, where the float16 spacing is 2."""
    if not active:
        yield
        return
    from segloss_core.reference import statistics

    real = statistics.compute

    def compute(inputs, names):
        stats, vjp = real(inputs, names)
        t = statistics.voxel_terms(inputs)
        terms = {"intersection": t.p * t.g, "pred_sum": t.p, "target_sum": t.g}
        for name, term in terms.items():
            if name in stats:
                weighted = np.where(np.broadcast_to(t.w, term.shape) == 0, 0.0, t.w * term).astype(np.float16)
                stats[name] = np.cumsum(weighted, axis=2, dtype=np.float16)[..., -1].astype(np.float64)
        return stats, vjp

    statistics.compute = compute
    try:
        yield
    finally:
        statistics.compute = real


def _planted_backend(bug):
    class PlantedBackend(NumpyBackend):
        name = f"planted-{bug}"
        conformance_dtypes = (ConformanceDtype("float64", 1e-7, 1e-9), ConformanceDtype("float16", 1e-2, 2e-3))

        def build(self, plan, **options):
            return _Planted(plan, bug)

        def run_on_mismatched_devices(self, loss, pred, target, mask, dtype):
            if bug != "accepts-mismatched-devices":
                return None  # one device (NumPy): the kit says "not applicable"
            # stands for a backend that moves the target to pred's device, or never compares them
            return self.run_for_conformance(loss, pred, target, mask, dtype)

    class Plugin:
        @hookimpl
        def segloss_register_backends(self, register):
            register(PlantedBackend())

    return Plugin()


def _quick_report_of_planted(bug):
    pm = plugin_manager()
    pm.register(_planted_backend(bug), name=f"planted-{bug}")
    try:
        return check_backend(f"planted-{bug}", losses=["dice"], quick=True)
    finally:
        pm.unregister(name=f"planted-{bug}")


@pytest.mark.parametrize("bug", ["value", "gradient", "ignore"])
def test_planted_bug_is_caught_and_reported(bug):
    report = _quick_report_of_planted(bug)
    assert not report.ok
    kinds = {f.what for f in report.failures}
    expected = {"value": {"value"}, "gradient": {"gradient"}, "ignore": {"value", "gradient"}}[bug]
    assert kinds <= expected and kinds
    if bug == "ignore":
        assert all("ignore" in f.case.kind for f in report.failures)
    text = str(report)
    assert "reproduce:" in text and "check_case(" in text and "max abs error" in text


# each bug class the kit must reject in its QUICK form: the input kinds its report may name first,
# and what disagrees
PLANTED_BUG_CLASSES = {
    "accepts-label-C": ({"invalid-label-equals-C"}, {"invalid"}),
    "accepts-mismatched-devices": ({"invalid-mismatched-devices"}, {"invalid"}),
    "float16-sums": ({"3d-large"}, {"value"}),
    "soft-target-gradient": ({"3d-soft", "3d-sigmoid-multilabel"}, {"gradient"}),
    "mask-before-activation": ({"3d-mask"}, {"value", "gradient"}),
    "nan-on-all-ignored": ({"2d-all-ignored"}, {"value"}),
}


@pytest.mark.parametrize("bug", sorted(PLANTED_BUG_CLASSES))
def test_the_quick_kit_rejects_each_bug_class_and_names_its_cause_first(bug):
    kinds, what = PLANTED_BUG_CLASSES[bug]
    report = _quick_report_of_planted(bug)
    assert not report.ok
    assert {f.what for f in report.failures} <= what and {f.case.kind for f in report.failures} <= kinds, str(report)
    lines = str(report).splitlines()
    first_group = lines[2].removeprefix("  input kind ").split(":")[0]
    assert lines[1] == "most failing:" and first_group in kinds, "\n".join(lines[:6])
    first_failure = next(line for line in lines if line.startswith("  FAIL "))
    assert f"-{first_group} [" in first_failure  # the failures listed first are of that kind
    if bug == "accepts-label-C":
        assert "raised RuntimeError: index 4 is out of bounds" in report.failures[0].detail
        assert "the input contract raises ValueError: target has labels outside [0, 4)" in report.failures[0].detail
    if bug == "float16-sums":
        assert {f.dtype for f in report.failures} == {"float16"}
    if bug == "accepts-mismatched-devices":
        assert "accepted the invalid input (the input contract raises ValueError: target is on device" in (
            report.failures[0].detail
        )


def test_a_backend_without_a_second_device_reports_the_device_case_not_applicable():
    report = check_backend("numpy", losses=["dice"], quick=True)
    (outcome,) = [o for o in report.outcomes if o.case.kind == "invalid-mismatched-devices"]
    assert (outcome.status, outcome.what) == ("skip", "not applicable")
    assert "offers no second device" in outcome.detail
    assert report.ok and report.summary().endswith("(1 not applicable)")


@pytest.mark.skipif("torch" not in AVAILABLE, reason="torch backend not available")
@pytest.mark.parametrize("options", [{}, {"impl": "native"}], ids=["auto", "native"])
def test_torch_refuses_a_target_on_another_device(options):
    """torch's second device is ``meta``: the case runs (and passes) on any machine."""
    case = Case("dice_ce", None, {"activation": "softmax"}, "invalid-mismatched-devices")
    outcome = check_case("torch", case, "float32", options)
    assert outcome.status == "pass", outcome
    import torch

    from segloss_core import get_loss

    with pytest.raises(ValueError, match="target is on device meta but pred is on cpu"):
        get_loss("dice", backend="torch", **options)(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, device="meta"))


def test_the_quick_kit_keeps_every_input_kind():
    from segloss_core.conformance import INPUT_KINDS, generate
    from segloss_core.registry import registry

    for name in ("dice", "cross_entropy", "dice_ce"):
        kinds = {case.kind for case in generate(registry().loss(name), quick=True)}
        assert kinds == set(INPUT_KINDS), (name, set(INPUT_KINDS) - kinds)


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
