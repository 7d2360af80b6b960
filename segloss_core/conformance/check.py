"""Run conformance cases against a backend and report, with reproducers, what disagrees."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backend import Backend, ConformanceDtype
from ..reference.evaluate import evaluate
from ..registry import registry
from .cases import INPUT_KINDS, Case, generate, materialise

MISMATCHED_DEVICES_MESSAGE = "target is on device"
"""What ``validate_inputs`` says when the target is on another device than pred (a ValueError:
"target is on device meta but pred is on cpu")."""
NOT_APPLICABLE = "not applicable"
"""``Outcome.what`` of a skipped case the backend cannot run here (no second device)."""


@dataclass(frozen=True)
class Outcome:
    case: Case
    backend: str
    dtype: str
    status: str  # "pass", "fail", "skip"
    what: str = ""  # "value", "gradient", "error", "invalid"; for a skip, why (NOT_APPLICABLE, ...)
    detail: str = ""
    max_abs_error: float = 0.0

    def __str__(self) -> str:
        head = f"{self.status.upper():4} {self.case.id} [{self.backend}/{self.dtype}]"
        return head + (f" {self.what}: {self.detail}" if self.detail else "")


@dataclass
class Report:
    backend: str
    outcomes: list[Outcome] = field(default_factory=list)
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "fail"]

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        counts = {s: sum(o.status == s for o in self.outcomes) for s in ("pass", "fail", "skip")}
        text = f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"
        not_applicable = sum(o.what == NOT_APPLICABLE for o in self.outcomes)
        return text + (f" ({not_applicable} not applicable)" if not_applicable else "")

    def failure_groups(self, limit: int = 3) -> list[tuple[str, int, int]]:
        """What the failures have in common, most telling first: ``(feature, failed, cases)``.

        A feature is an input kind, a parameter value, a dtype or a loss; ranked by the share
        of its cases that fail, then by the number of failures. Features every case shares
        (one loss, one dtype) tell nothing and are left out unless nothing else is left.
        """
        failed: dict[str, int] = {}
        total: dict[str, int] = {}
        for outcome in self.outcomes:
            for feature in _features(outcome):
                total[feature] = total.get(feature, 0) + 1
                if outcome.status == "fail":
                    failed[feature] = failed.get(feature, 0) + 1
        ranked = sorted(failed, key=lambda f: (-failed[f] / total[f], -failed[f], f))
        telling = [f for f in ranked if total[f] < len(self.outcomes)] or ranked
        return [(f, failed[f], total[f]) for f in telling[:limit]]

    def __str__(self) -> str:
        options = f" with {dict(self.options)}" if self.options else ""
        lines = [f"segloss conformance of backend {self.backend!r}{options}: {self.summary()}"]
        groups = self.failure_groups()
        if groups:
            lines.append("most failing:")
            lines += [f"  {feature}: {bad} of {cases} cases fail" for feature, bad, cases in groups]
            first = groups[0][0]  # the failures that share the most telling feature come first
        failures = sorted(self.failures, key=lambda o: first not in _features(o)) if groups else []
        for failure in failures:
            lines.append(f"  {failure}")
            lines.append("    reproduce:")
            reproducer = failure.case.reproducer(failure.backend, failure.dtype, self.options)
            lines += ["      " + line for line in reproducer.splitlines()]
        return "\n".join(lines)


def _features(outcome: Outcome) -> list[str]:
    case = outcome.case
    params = [f"parameter {k}={_short_value(v)}" for k, v in sorted(case.params.items()) if k != "activation"]
    preset = [f"preset {case.preset}"] if case.preset else []
    return [f"input kind {case.kind}", *params, *preset, f"dtype {outcome.dtype}", f"loss {case.loss}"]


def _short_value(value: Any) -> str:
    return "per-class" if isinstance(value, tuple) else str(value)


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """x rounded to ``dtype`` and back to float64 (bfloat16 by round-to-nearest-even)."""
    if dtype == "bfloat16":
        bits = np.asarray(x, dtype=np.float32).view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
        return rounded.view(np.float32).astype(np.float64)
    return np.asarray(x).astype(dtype).astype(np.float64)


def _compare(got: np.ndarray, want: np.ndarray, tol: ConformanceDtype, scale: float) -> tuple[bool, float, str]:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return False, float("inf"), f"shape {got.shape}, reference {want.shape}"
    if not np.all(np.isfinite(want)):
        return False, float("inf"), "the reference itself is not finite on these inputs (a spec bug)"
    err = np.abs(got - want)
    err = np.where(np.isfinite(err), err, np.inf)
    allowed = tol.atol * max(scale, 1.0) + tol.rtol * np.abs(want)
    bad = err > allowed
    worst = float(err.max()) if err.size else 0.0
    if bad.any():
        index = np.unravel_index(int(np.argmax(np.where(bad, err, -1.0))), err.shape)
        return (
            False,
            worst,
            (
                f"max abs error {worst:.3g} (at {tuple(int(i) for i in index)}: got {got[index]!r}, reference "
                f"{want[index]!r}; tolerance rtol={tol.rtol:g}, atol={tol.atol:g})"
            ),
        )
    return True, worst, ""


def check_case(
    backend_name: str,
    case: Case,
    dtype: str | ConformanceDtype = "float64",
    options: Mapping[str, Any] | None = None,
) -> Outcome:
    """Run one case on one dtype: compare value and gradient with the float64 reference.

    ``options`` are backend options (e.g. ``{"impl": "native"}`` for torch), passed to every build.
    """
    reg = registry()
    backend: Backend = reg.backend(backend_name)
    if isinstance(dtype, str):
        matches = [d for d in backend.conformance_dtypes if d.name == dtype]
        tol = matches[0] if matches else ConformanceDtype(dtype, 1e-4, 1e-5)
    else:
        tol = dtype
    if not case.arrays:
        case = materialise(case)
    spec = reg.loss(case.loss)
    try:
        params = spec.resolve(case.preset, **case.params)
        plan = spec.plan(params, reg)
    except (TypeError, ValueError) as exc:
        return Outcome(case, backend_name, tol.name, "skip", "invalid", f"parameters refused: {exc}")
    floor = max(t.spec.tolerance_floor for t in plan.terms)
    if floor > tol.rtol:
        tol = ConformanceDtype(tol.name, floor, max(tol.atol, floor * 1e-2))
    pred = round_to_dtype(case.arrays["pred"], tol.name)
    target = case.arrays["target"]
    if target.dtype.kind == "f":
        target = round_to_dtype(target, tol.name)
    mask = case.arrays.get("mask")
    if INPUT_KINDS[case.kind].invalid:
        return _check_invalid(backend, backend_name, case, plan, (pred, target, mask), tol, options)
    try:
        want_value, _ = evaluate(plan, pred, target, mask, with_grad=False)
        ones = None if np.ndim(want_value) == 0 else np.ones_like(want_value)
        want_value, want_grad = evaluate(plan, pred, target, mask, grad_output=ones)
    except ValueError as exc:
        return Outcome(case, backend_name, tol.name, "skip", "invalid", f"inputs refused by the reference: {exc}")
    try:
        loss = reg.build(plan, backend_name, options)
        got_value, got_grad = backend.run_for_conformance(loss, pred, target, mask, tol.name)
    except Exception as exc:  # noqa: BLE001 - any backend error is a failure to report
        return Outcome(case, backend_name, tol.name, "fail", "error", f"{type(exc).__name__}: {exc}")
    assert want_grad is not None
    ok, err, detail = _compare(got_value, want_value, tol, 1.0)
    if not ok:
        return Outcome(case, backend_name, tol.name, "fail", "value", detail, err)
    scale = float(np.nanmax(np.abs(want_grad))) if want_grad.size else 1.0
    ok, err, detail = _compare(got_grad, want_grad, tol, scale if np.isfinite(scale) else 1.0)
    if not ok:
        return Outcome(case, backend_name, tol.name, "fail", "gradient", detail, err)
    return Outcome(case, backend_name, tol.name, "pass", max_abs_error=err)


def _check_invalid(
    backend: Backend,
    backend_name: str,
    case: Case,
    plan: Any,
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    tol: ConformanceDtype,
    options: Mapping[str, Any] | None,
) -> Outcome:
    """A broken input: the backend must raise what the reference raises (the input contract of
    ``segloss_core.validation``: the same exception type, a message containing the reference's;
    for pred and target on two devices, ValueError containing :data:`MISMATCHED_DEVICES_MESSAGE`),
    or, where the contract lets the input through (a NaN logit), return what the reference returns
    (NaN where it gives NaN)."""
    pred, target, mask = arrays
    fail = lambda what, detail: Outcome(case, backend_name, tol.name, "fail", what, detail)  # noqa: E731
    devices = INPUT_KINDS[case.kind].invalid == "mismatched-devices"
    want_type: type[BaseException] | None = None
    if devices:  # NumPy has one device: the contract's message is known, not computed by the reference
        want_type, want_text = ValueError, MISMATCHED_DEVICES_MESSAGE
    else:
        try:
            want_value, _ = evaluate(plan, pred, target, mask, with_grad=False)
        except (TypeError, ValueError) as exc:
            want_type, want_text = type(exc), str(exc)
    try:
        loss = registry().build(plan, backend_name, options)
    except Exception as exc:  # noqa: BLE001 - any backend error is a failure to report
        return fail("error", f"{type(exc).__name__}: {exc}")
    try:
        if devices:
            ran = backend.run_on_mismatched_devices(loss, pred, target, mask, tol.name)
            if ran is None:
                return Outcome(
                    case,
                    backend_name,
                    tol.name,
                    "skip",
                    NOT_APPLICABLE,
                    f"{NOT_APPLICABLE}: backend {backend_name!r} offers no second device here "
                    "(Backend.run_on_mismatched_devices returned None)",
                )
            got_value = ran[0]
        else:
            got_value, _ = backend.run_for_conformance(loss, pred, target, mask, tol.name)
        got: BaseException | None = None
    except Exception as exc:  # noqa: BLE001 - compared with what the contract raises
        got = exc
    if want_type is not None:
        contract = f"the input contract raises {want_type.__name__}: {want_text}"
        if got is None:
            return fail("invalid", f"accepted the invalid input ({contract})")
        if not isinstance(got, want_type) or want_text not in str(got):
            return fail("invalid", f"raised {type(got).__name__}: {got}; {contract}")
        return Outcome(case, backend_name, tol.name, "pass")
    if got is not None:
        return fail("error", f"{type(got).__name__}: {got}")
    got_arr, want_arr = np.asarray(got_value, dtype=np.float64), np.asarray(want_value, dtype=np.float64)
    # documented (docs/architecture.md, the input contract): a NaN logit gives a NaN loss. The
    # value must be NaN wherever the reference's is; elsewhere (losses that select voxels, whose
    # reference may pass the NaN voxel by) NaN or the reference's value
    if got_arr.shape != want_arr.shape or (np.isnan(want_arr) & ~np.isnan(got_arr)).any():
        return fail(
            "value",
            f"got {got_arr!r}, reference {want_arr!r}: a NaN logit must give a NaN loss (docs/architecture.md, "
            "the input contract)",
        )
    finite = ~np.isnan(want_arr) & ~np.isnan(got_arr)
    ok, err, detail = _compare(got_arr[finite], want_arr[finite], tol, 1.0)
    return Outcome(case, backend_name, tol.name, "pass" if ok else "fail", "" if ok else "value", detail, err)


def cases_for(losses: Iterable[str] | None = None, *, quick: bool = False) -> list[Case]:
    reg = registry()
    names = list(losses) if losses is not None else reg.loss_names()
    out: list[Case] = []
    for name in names:
        out.extend(generate(reg.loss(name), quick=quick))
    return out


def _dtypes_for(case: Case, dtypes: Sequence[Any]) -> list[Any]:
    """Every dtype, but an invalid input only on the first (the checks come before any arithmetic)."""
    return list(dtypes[:1]) if INPUT_KINDS[case.kind].invalid else list(dtypes)


def conformance_matrix(
    backends: Sequence[str],
    *,
    losses: Sequence[str] | None = None,
    dtypes: Sequence[str] | None = None,
    quick: bool = False,
) -> list[tuple[str, Case, str]]:
    """(backend, case, dtype) rows for every loss each backend supports (pytest parametrisation)."""
    reg = registry()
    rows: list[tuple[str, Case, str]] = []
    for backend_name in backends:
        backend = reg.backend(backend_name)
        names = [n for n in (losses or reg.loss_names()) if reg._supports(backend, reg.loss(n))]
        wanted = [d.name for d in backend.conformance_dtypes if dtypes is None or d.name in dtypes]
        for case in cases_for(names, quick=quick):
            rows.extend((backend_name, case, dtype) for dtype in _dtypes_for(case, wanted))
    return rows


def check_backend(
    backend_name: str,
    losses: Sequence[str] | None = None,
    dtypes: Sequence[str] | None = None,
    *,
    quick: bool = False,
    options: Mapping[str, Any] | None = None,
) -> Report:
    """Every case of every loss the backend supports, on each of its conformance dtypes
    (``options``: backend options for every build, e.g. ``{"impl": "native"}``)."""
    reg = registry()
    backend = reg.backend(backend_name)
    names = [n for n in (losses or reg.loss_names()) if reg._supports(backend, reg.loss(n))]
    wanted = [d for d in backend.conformance_dtypes if dtypes is None or d.name in dtypes]
    report = Report(backend_name, options=dict(options or {}))
    for case in cases_for(names, quick=quick):
        case = materialise(case)
        for dtype in _dtypes_for(case, wanted):
            report.outcomes.append(check_case(backend_name, case, dtype, options))
    return report
