"""Conformance cases, generated from the loss specs.

A case is (loss, preset, parameters, input kind, seed); its arrays are regenerated
deterministically from that key, so a failing case prints a one-line reproducer.

Input kinds cover what the rules of the house ask for: 2D and 3D, one sigmoid channel and
several softmax channels, classes absent from a sample, single-voxel objects, ignored
voxels, a sample with every voxel ignored, soft targets, voxel masks; one large volume
(``3d-large``, 2 × 64³ voxels: sums over 262144 voxels per sample, beyond float16's largest
value 65504, so a float16 accumulator overflows whatever its summation order; a naive one already
stalls at 2048, e.g. Dice 0 instead of 0.667); and invalid inputs (``invalid-*``: a label
equal to C, a negative label, float labels, wrong target and pred shapes, a NaN logit, pred and
target on different devices), for which a backend must raise what the input contract raises (or,
for NaN, return NaN; two devices: "not applicable" where the backend cannot offer two).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..spec import LossSpec, Param

IGNORE = 255


@dataclass(frozen=True)
class InputKind:
    name: str
    spatial: tuple[int, ...]
    channels: int
    activation: str  # the activation the inputs are made for
    target: str = "labels"  # labels | soft
    ignore: bool = False
    all_ignored_sample: bool = False
    mask: bool = False
    invalid: str = ""  # how a valid input of this kind is then broken (INVALID_KINDS)


INPUT_KINDS: dict[str, InputKind] = {
    k.name: k
    for k in (
        InputKind("3d-softmax", (5, 4, 3), 3, "softmax"),
        InputKind("2d-softmax", (7, 6), 4, "softmax"),
        InputKind("1d-softmax", (11,), 3, "softmax"),
        InputKind("2d-sigmoid-binary", (6, 5), 1, "sigmoid"),
        InputKind("3d-sigmoid-multilabel", (4, 4, 3), 3, "sigmoid", target="soft"),
        InputKind("3d-soft", (4, 5, 3), 3, "softmax", target="soft"),
        InputKind("2d-ignore", (6, 6), 3, "softmax", ignore=True),
        InputKind("2d-all-ignored", (5, 5), 3, "softmax", ignore=True, all_ignored_sample=True),
        InputKind("3d-mask", (4, 4, 4), 3, "softmax", mask=True),
        InputKind("2d-sigmoid-ignore", (6, 6), 1, "sigmoid", ignore=True),
        InputKind("3d-large", (64, 64, 64), 2, "softmax"),
        *(
            InputKind(f"invalid-{how}", (7, 6), 4, "softmax", invalid=how)
            for how in (
                "label-equals-C",
                "negative-label",
                "float-labels",
                "target-shape",
                "pred-shape",
                "nan-logit",
                "mismatched-devices",
            )
        ),
    )
}
PARAM_SWEEP_KINDS = ("3d-softmax", "2d-sigmoid-binary")
LARGE_KINDS = ("3d-large",)
"""Run once per loss (its defaults), in the quick kit too: large enough to expose low-precision sums."""
INVALID_KINDS = tuple(name for name, kind in INPUT_KINDS.items() if kind.invalid)
"""Broken inputs, once per loss (its defaults), in the quick kit too: the backend must raise the
reference's exception type with its message (``invalid-nan-logit``: return NaN, as documented;
``invalid-mismatched-devices``: the contract's ValueError, through the backend's
:meth:`~segloss_core.Backend.run_on_mismatched_devices`, or "not applicable" without one)."""


@dataclass(frozen=True)
class Case:
    loss: str
    preset: str | None
    params: Mapping[str, Any]
    kind: str
    seed: int = 0
    arrays: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    @property
    def id(self) -> str:
        parts = [self.loss]
        if self.preset:
            parts.append(self.preset)
        parts += [f"{k}={_short(v)}" for k, v in sorted(self.params.items())]
        parts.append(self.kind)
        return "-".join(parts)

    def reproducer(self, backend: str, dtype: str, options: Mapping[str, Any] | None = None) -> str:
        extra = f", {dict(options)!r}" if options else ""
        return (
            "from segloss_core.conformance import Case, check_case\n"
            f"case = Case({self.loss!r}, {self.preset!r}, {dict(self.params)!r}, {self.kind!r}, seed={self.seed})\n"
            f"print(check_case({backend!r}, case, {dtype!r}{extra}))"
        )


def _short(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ",".join(_short(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def make_arrays(kind_name: str, seed: int, activation: str) -> dict[str, np.ndarray]:
    """pred (float64), target, mask for an input kind; pred are probabilities for activation 'none'."""
    kind = INPUT_KINDS[kind_name]
    rng = np.random.default_rng(seed + 7919 * sum(map(ord, kind_name)))
    batch = 2
    shape = (batch, kind.channels, *kind.spatial)
    pred = rng.normal(scale=1.5, size=shape)
    out: dict[str, np.ndarray] = {}
    if kind.target == "soft":
        raw = rng.random(shape)
        if kind.activation == "softmax":
            target = raw / raw.sum(axis=1, keepdims=True)
        else:
            target = raw
        # one exactly one-hot sample keeps the hard-label paths honest
        target[0] = (
            (target[0] == target[0].max(axis=0, keepdims=True)).astype(np.float64)
            if kind.channels > 1
            else (target[0] > 0.5)
        )
        out["target"] = target.astype(np.float64)
    else:
        high = 2 if kind.channels == 1 else kind.channels
        labels = rng.integers(0, high, size=(batch, *kind.spatial))
        if kind.channels > 1:
            labels[0][labels[0] == kind.channels - 1] = 0  # last class absent from sample 0
            flat = labels[1].reshape(-1)
            flat[flat == kind.channels - 1] = 1
            flat[rng.integers(flat.size)] = kind.channels - 1  # ... and a single voxel in sample 1
        else:
            labels[0] = 0  # empty foreground in sample 0
            labels[0].reshape(-1)[rng.integers(labels[0].size)] = 1  # ... but for one voxel
        if kind.ignore:
            ignored = rng.random(labels.shape) < 0.25
            labels[ignored] = IGNORE
            if kind.all_ignored_sample:
                labels[0] = IGNORE
        out["target"] = labels.astype(np.int64)
    if kind.mask:
        mask = rng.random((batch, 1, *kind.spatial))
        mask[mask < 0.2] = 0.0
        out["mask"] = mask
    if activation == "none":
        if kind.channels == 1 or kind.activation == "sigmoid":
            pred = 1.0 / (1.0 + np.exp(-pred))
        else:
            e = np.exp(pred - pred.max(axis=1, keepdims=True))
            pred = e / e.sum(axis=1, keepdims=True)
    out["pred"] = pred
    return _break(kind, out) if kind.invalid else out


def _break(kind: InputKind, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A valid input of ``kind`` made invalid in the one way ``kind.invalid`` names."""
    pred, target = arrays["pred"].copy(), arrays["target"].copy()
    if kind.invalid == "label-equals-C":
        target[0].reshape(-1)[0] = kind.channels
    elif kind.invalid == "negative-label":
        target[1].reshape(-1)[-1] = -1
    elif kind.invalid == "float-labels":
        target = target.astype(np.float64)  # (B, *spatial) floats for C > 1 channels: neither labels nor soft
    elif kind.invalid == "target-shape":
        target = target[..., :-1]
    elif kind.invalid == "pred-shape":
        pred = pred.reshape(pred.shape[0], pred.shape[1], -1)[..., 0]  # (B, C): no spatial axis
    elif kind.invalid == "nan-logit":
        pred[0, 0].reshape(-1)[0] = np.nan
    elif kind.invalid == "mismatched-devices":
        pass  # valid arrays: the backend's Backend.run_on_mismatched_devices puts them on two devices
    else:  # pragma: no cover - INPUT_KINDS lists the ways
        raise AssertionError(kind.invalid)
    return {**arrays, "pred": pred, "target": target}


def materialise(case: Case) -> Case:
    activation = case.params.get("activation", INPUT_KINDS[case.kind].activation)
    arrays = make_arrays(case.kind, case.seed, activation)
    return Case(case.loss, case.preset, case.params, case.kind, case.seed, arrays)


def _kind_params(spec: LossSpec, kind: InputKind) -> dict[str, Any]:
    """Parameters an input kind requires (its activation, its ignore_index)."""
    names = {p.name for p in spec.params}
    params: dict[str, Any] = {}
    if "activation" in names:
        choices = spec.param("activation").choices or ()
        if kind.activation in choices:
            params["activation"] = kind.activation
    if kind.ignore and "ignore_index" in names:
        params["ignore_index"] = IGNORE
    return params


def _variants(param: Param) -> list[Any]:
    values: list[Any] = []
    if param.kind == "bool":
        values.append(not param.default)
    elif param.kind == "choice":
        values.extend(c for c in param.choices or () if c != param.default)
    values.extend(v for v in param.examples if v != param.default)
    if param.name in ("class_weights", "pos_weight"):
        values.append("per-class")
    return values


def _per_class(name: str, channels: int) -> tuple[float, ...]:
    return (
        tuple(0.5 + 0.75 * c for c in range(channels))
        if name == "class_weights"
        else tuple(2.0 - 0.5 * c for c in range(channels))
    )


def _sums_only(spec: LossSpec) -> bool:
    """True for a loss (or a compound of losses) computed from plain statistics, without fields."""
    from ..registry import registry

    specs = [registry().loss(term.loss) for term in spec.terms] if spec.terms else [spec]
    return all(s.kind == "statistics" and s.fields is None for s in specs)


def generate(spec: LossSpec, *, quick: bool = False, seed: int = 0) -> Iterator[Case]:
    """Every case for ``spec``: defaults and presets on each input kind, then each
    parameter at each non-default value on the sweep kinds."""
    once = (*LARGE_KINDS, *INVALID_KINDS)
    kinds = [k for k in INPUT_KINDS.values() if k.name not in once]
    presets: list[str | None] = [None, *(p.name for p in spec.presets)]
    seen: set[str] = set()

    def emit(case: Case) -> Iterator[Case]:
        if case.id not in seen:
            seen.add(case.id)
            yield case

    # quick: every input kind on the defaults, the first preset on the first kind only
    for kind in kinds:
        for preset in presets if not quick else presets[: 2 if kind is kinds[0] else 1]:
            yield from emit(Case(spec.name, preset, _kind_params(spec, kind), kind.name, seed))
    for name in once:
        if name in LARGE_KINDS and not _sums_only(spec):
            continue  # the large case is about forward sums; a 64^3 EDT or skeleton reference would be slow
        yield from emit(Case(spec.name, None, _kind_params(spec, INPUT_KINDS[name]), name, seed))
    sweep = [INPUT_KINDS[k] for k in PARAM_SWEEP_KINDS]
    for param in spec.params:
        if param.name in ("activation", "ignore_index"):
            continue
        for value in _variants(param):
            for kind in sweep if not quick else sweep[:1]:
                params = _kind_params(spec, kind)
                params[param.name] = _per_class(param.name, kind.channels) if value == "per-class" else value
                yield from emit(Case(spec.name, None, params, kind.name, seed))
    # the "none" activation (probabilities in), where the spec offers it
    if "activation" in {p.name for p in spec.params} and "none" in (spec.param("activation").choices or ()):
        for kind_name in ("3d-softmax", "2d-sigmoid-binary"):
            kind = INPUT_KINDS[kind_name]
            params = _kind_params(spec, kind)
            params["activation"] = "none"
            yield from emit(Case(spec.name, None, params, kind.name, seed))
