"""Loss specifications: parameters, presets, formula text, references, and the math hooks.

A :class:`LossSpec` is the single definition of a loss. Backends never re-declare a
parameter: they receive a resolved :class:`Params` (defaults, then the preset, then the
caller's values, each checked here) inside a :class:`LossPlan`.

Three kinds of loss exist:

``statistics``
    the loss is a formula of per-(sample, class) sums (``required_statistics`` +
    ``from_statistics``); every backend that can compute the statistics gets the loss.
``voxelwise``
    the loss needs per-voxel work beyond sums (top-k, sorting); the spec gives a float64
    NumPy ``reference`` and each backend brings its own implementation.
``compound``
    a weighted sum of other registered losses (``terms``).
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LossPlan",
    "LossSpec",
    "Param",
    "Params",
    "PlanTerm",
    "Preset",
    "Term",
    "close_matches",
]

PARAM_KINDS = ("bool", "int", "float", "choice", "float_seq", "int_seq", "regions", "object")


def close_matches(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' or ''."""
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {found[0]!r}?)" if found else ""


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class Param:
    """One parameter of a loss: type, default, allowed values and a one-line meaning.

    ``kind`` is one of ``bool``, ``int``, ``float``, ``choice`` (one of ``choices``),
    ``float_seq`` / ``int_seq`` (a sequence, e.g. one weight per class), ``regions`` (a sequence of
    label sequences, :func:`segloss_core.regions.check_regions`). ``low``/``high``
    bound numbers (and every element of a sequence); ``low_open``/``high_open`` make a bound
    strict. ``optional`` admits ``None``. ``examples`` are non-default values the
    conformance suite tries (choices are tried automatically).
    """

    name: str
    kind: str
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    examples: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in PARAM_KINDS:
            raise ValueError(f"Param {self.name!r}: kind must be one of {PARAM_KINDS}, got {self.kind!r}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"Param {self.name!r}: a choice parameter needs choices")
        if self.default is not None or not self.optional:
            object.__setattr__(self, "default", self.convert(self.default, owner="(spec default)"))

    # -- description ------------------------------------------------------------------
    def type_label(self) -> str:
        """Human-readable type and range, e.g. ``float in [0, inf)`` or ``'a' | 'b'``."""
        if self.kind == "choice":
            label = " | ".join(repr(c) for c in self.choices or ())
        else:
            base = {
                "bool": "bool",
                "int": "int",
                "float": "float",
                "float_seq": "sequence of float",
                "int_seq": "sequence of int",
                "regions": "sequence of label sequences",
            }[self.kind]
            if self.low is not None or self.high is not None:
                lo = "(" if self.low_open or self.low is None else "["
                hi = ")" if self.high_open or self.high is None else "]"
                low = "-inf" if self.low is None else f"{self.low:g}"
                high = "inf" if self.high is None else f"{self.high:g}"
                base += f" in {lo}{low}, {high}{hi}"
            label = base
        return label + (" or None" if self.optional else "")

    # -- checking -----------------------------------------------------------------------
    def _range_error(self, value: float, owner: str) -> ValueError | None:
        bad_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        bad_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if value != value or bad_low or bad_high:  # NaN fails every range
            return ValueError(f"{owner}: parameter {self.name!r} must be {self.type_label()}, got {value!r}")
        return None

    def convert(self, value: Any, owner: str) -> Any:
        """Return the canonical value or raise ``TypeError``/``ValueError`` naming the parameter."""
        if value is None:
            if self.optional:
                return None
            raise TypeError(f"{owner}: parameter {self.name!r} must be {self.type_label()}, got None")
        kind = self.kind
        if kind == "object":  # backend options only (e.g. a torch process group): passed through
            return value
        if kind == "regions":
            from .regions import check_regions

            return check_regions(value, owner, self.name)
        if kind == "bool":
            if hasattr(value, "dtype") and getattr(value, "shape", None) == () and str(value.dtype) == "bool":
                value = bool(value)
            if not isinstance(value, bool):
                raise TypeError(f"{owner}: parameter {self.name!r} must be a bool, got {type(value).__name__}")
            return value
        if kind == "choice":
            if value not in (self.choices or ()):
                hint = close_matches(str(value), [str(c) for c in self.choices or ()])
                raise ValueError(
                    f"{owner}: parameter {self.name!r} must be one of "
                    f"{', '.join(repr(c) for c in self.choices or ())}; got {value!r}{hint}"
                )
            return value
        if kind in ("int", "float"):
            ok = _is_int(value) if kind == "int" else _is_real(value)
            if not ok:
                got = f"{type(value).__name__} {value!r}"
                raise TypeError(f"{owner}: parameter {self.name!r} must be {self.type_label()}, got {got}")
            value = int(value) if kind == "int" else float(value)
            err = self._range_error(value, owner)
            if err:
                raise err
            return value
        # sequences: lists, tuples, 1-D numpy/torch/cupy arrays
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            if hasattr(value, "tolist"):
                value = value.tolist()
            if not isinstance(value, (list, tuple)):
                raise TypeError(
                    f"{owner}: parameter {self.name!r} must be {self.type_label()}, got {type(value).__name__}"
                )
        if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
            value = value.tolist()
        items = list(value)
        if any(isinstance(item, (list, tuple)) for item in items):
            raise TypeError(f"{owner}: parameter {self.name!r} must be a flat sequence, got nested {value!r}")
        check = _is_int if kind == "int_seq" else _is_real
        for item in items:
            if not check(item):
                raise TypeError(
                    f"{owner}: parameter {self.name!r} must be {self.type_label()}, element {item!r} is "
                    f"{type(item).__name__}"
                )
            err = self._range_error(float(item), owner)
            if err:
                raise err
        if not items:
            raise ValueError(f"{owner}: parameter {self.name!r} must not be empty")
        return tuple(int(i) if kind == "int_seq" else float(i) for i in items)


@dataclass(frozen=True)
class Preset:
    """A named parameter set reproducing some library's or paper's convention."""

    name: str
    values: Mapping[str, Any]
    summary: str
    source: str = ""


class Params(Mapping[str, Any]):
    """Resolved, checked, immutable parameter values; also readable as attributes.

    ``explicit`` names the parameters the caller gave (to ``get_loss``, ``compound``, ``explain``,
    or to a compound loss that routes them to its components); a value that came from the default
    or from the preset is not explicit. A ``check`` uses it where giving two parameters together is
    the mistake, whatever their values (``classes`` with ``include_background``). It is not part of
    equality or the hash: the same values make the same loss."""

    __slots__ = ("_values", "explicit", "loss", "preset")

    def __init__(self, values: Mapping[str, Any], loss: str, preset: str | None, explicit: Iterable[str] = ()) -> None:
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "loss", loss)
        object.__setattr__(self, "preset", preset)
        object.__setattr__(self, "explicit", frozenset(explicit))

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"loss {self.loss!r} has no parameter {key!r}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("Params are immutable; use .replace(**changes)")

    def replace(self, **changes: Any) -> Params:
        return Params({**self._values, **changes}, self.loss, self.preset, self.explicit)

    def __hash__(self) -> int:
        return hash((self.loss, tuple(sorted(self._values.items()))))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Params) and other.loss == self.loss and other._values == self._values

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._values.items())
        return f"Params[{self.loss}{'/' + self.preset if self.preset else ''}]({inner})"


@dataclass(frozen=True)
class Term:
    """A component of a compound loss: a registered loss and the parameter holding its weight.

    ``fixed`` values always go to the component; ``switches`` maps a boolean parameter of the
    compound to the component values it sets when true (e.g. dice_focal's ``sigmoid_focal`` sets
    the focal term's ``activation`` to ``"sigmoid"``)."""

    loss: str
    weight_param: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    switches: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanTerm:
    weight: float
    spec: LossSpec
    params: Params


@dataclass(frozen=True)
class LossPlan:
    """What a backend builds: resolved terms (one for a plain loss) and what they share."""

    name: str
    terms: tuple[PlanTerm, ...]
    preset: str | None = None

    @property
    def activation(self) -> str:
        return self.activations[0]

    @property
    def activations(self) -> tuple[str, ...]:
        """Distinct activations of the terms, in order (a compound may mix them)."""
        return tuple(dict.fromkeys(t.params.get("activation", "none") for t in self.terms))

    @property
    def ignore_index(self) -> int | None:
        return self.terms[0].params.get("ignore_index")

    @property
    def regions(self) -> tuple[tuple[int, ...], ...] | None:
        """The regions of region-based training (every term shares them; checked when the plan is made)."""
        return next((t.params["regions"] for t in self.terms if t.params.get("regions") is not None), None)

    def __post_init__(self) -> None:
        from .regions import check_plan_regions

        check_plan_regions(self)

    @property
    def call_inputs(self) -> tuple[str, ...]:
        names: list[str] = []
        for term in self.terms:
            names.extend(n for n in term.spec.call_inputs if n not in names)
        return tuple(names)

    @property
    def reduction(self) -> str:
        return self.terms[0].params.get("reduction", "mean")

    def __reduce__(self) -> tuple[Any, ...]:
        # specs hold functions (closures) that pickle cannot carry: rebuild from registered names
        terms = tuple(
            (t.weight, t.spec.name, dict(t.params), t.params.preset, tuple(sorted(t.params.explicit)))
            for t in self.terms
        )
        return (_plan_from_names, (self.name, terms, self.preset))

    def describe(self) -> str:
        parts = []
        for term in self.terms:
            parts.append(f"{term.weight:g}·{term.spec.name}({', '.join(f'{k}={v!r}' for k, v in term.params.items())})")
        return " + ".join(parts)


def _plan_from_names(
    name: str, terms: tuple[tuple[float, str, dict[str, Any], str | None, tuple[str, ...]], ...], preset: str | None
):
    from .registry import registry

    reg = registry()
    rebuilt = []
    for weight, loss_name, values, term_preset, explicit in terms:
        spec = reg.loss(loss_name)
        params = Params(values, loss_name, term_preset, explicit)
        if spec.check is not None:
            spec.check(params)
        rebuilt.append(PlanTerm(weight, spec, params))
    return LossPlan(name, tuple(rebuilt), preset)


StatisticsFn = Callable[[Params], frozenset[str]]
FormulaFn = Callable[[Any, Mapping[str, Any], Params], Any]
API_VERSION = 1
"""Version of the plugin interface (``LossSpec`` and :class:`~segloss_core.backend.Backend`). A
plugin states the version it was written for in ``api_version``; the registry refuses losses and
backends written for a newer one."""


@dataclass(frozen=True)
class ElementMap:
    """``reduction="none"`` of a loss that is a (weighted) mean over elements: the elements themselves.

    ``statistics(params)`` names the statistics whose per-voxel terms the map is made of (each
    ``w·term`` of :data:`segloss_core.statistics.TABLE`, shape (B, C, N), from
    :meth:`segloss_core.executor.Kernels.elements`); ``combine(xp, elements, params)`` is the same
    linear combination that makes the loss's numerator from the statistics, without the sum over
    voxels: it returns (B, K, N) or (B, N), which the executor reshapes to (B, [K,] *spatial)."""

    statistics: Callable[[Params], frozenset[str]]
    combine: Callable[[Any, Mapping[str, Any], Params], Any]


ReferenceFn = Callable[..., tuple[Any, Any]]
FieldsFn = Callable[[Any, Params, Mapping[str, Any]], dict[str, Any]]
ArrayForwardFn = Callable[[Any, Any, Any, Any, Any, Params], Any]


@dataclass(frozen=True)
class LossSpec:
    """The one definition of a loss.

    Exactly one of (``required_statistics`` and ``from_statistics``), ``reference`` or
    ``terms`` defines the math. ``formula`` is the text shown by ``describe``; it should
    give the formula with every constant. ``check`` validates parameter combinations
    (raise ``ValueError`` naming the parameters). ``call_inputs`` are the optional keyword
    arguments a built loss accepts at call time besides ``(pred, target)``.
    """

    name: str
    summary: str
    params: tuple[Param, ...]
    formula: str
    references: tuple[str, ...] = ()
    presets: tuple[Preset, ...] = ()
    required_statistics: StatisticsFn | None = None
    from_statistics: FormulaFn | None = None
    reference: ReferenceFn | None = None
    array_forward: ArrayForwardFn | None = None
    """Voxelwise math in array-API code: ``array_forward(xp, ops, p, g, w, params)`` with p the
    probabilities (B, C, *S), g the target, w the voxel weights (B, 1|C, *S) and ``ops`` the
    :mod:`segloss_core.operators`; every backend with operators computes (and differentiates) it,
    the NumPy reference through its tape."""
    terms: tuple[Term, ...] = ()
    check: Callable[[Params], None] | None = None
    call_inputs: tuple[str, ...] = ("mask",)
    notes: str = ""
    family: str = ""
    tolerance_floor: float = 0.0
    """Smallest relative tolerance the conformance suite applies to this loss, for losses whose
    backends may compute an input in lower precision by design (float32 distance maps)."""
    fields: FieldsFn | None = None
    """Per-voxel constant fields (e.g. distance maps) the statistics need: called with the
    validated inputs, the parameters and the call-time inputs; returns {name: (B, C, *S) array}
    on the inputs' device and framework (no gradient flows into them)."""
    api_version: int = API_VERSION
    """The plugin API this spec was written for (a loss plugin needing a newer segloss sets it)."""
    min_spatial_dims: int = 1
    """Fewest spatial dims ``pred`` may have: 0 for losses defined per voxel (cross-entropy, focal),
    which then take classification-style (B, C) logits and (B,) labels."""
    element_map: ElementMap | None = None
    """A statistics loss whose ``reduction="none"`` returns per-element values (cross-entropy, focal):
    computed by :class:`ElementMap` from per-voxel terms, not from the statistics."""

    def uses_element_map(self, params: Params) -> bool:
        """Whether these parameters ask for the element map (``reduction="none"``)."""
        return self.element_map is not None and params.get("reduction") == "none"

    def __post_init__(self) -> None:
        defined = [
            self.required_statistics is not None and self.from_statistics is not None,
            self.reference is not None or self.array_forward is not None,
            bool(self.terms),
        ]
        if sum(defined) != 1:
            raise ValueError(
                f"LossSpec {self.name!r}: define exactly one of (required_statistics + from_statistics), "
                "reference and/or array_forward, or terms"
            )
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"LossSpec {self.name!r}: duplicate parameter names {names}")
        for preset in self.presets:
            unknown = set(preset.values) - set(names)
            if unknown:
                raise ValueError(f"LossSpec {self.name!r}: preset {preset.name!r} sets unknown {sorted(unknown)}")

    # -- introspection ---------------------------------------------------------------
    @property
    def kind(self) -> str:
        if self.terms:
            return "compound"
        return "statistics" if self.from_statistics is not None else "voxelwise"

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def preset(self, name: str) -> Preset:
        for p in self.presets:
            if p.name == name:
                return p
        raise ValueError(
            f"loss {self.name!r} has no preset {name!r}{close_matches(name, [p.name for p in self.presets])}; "
            f"presets: {', '.join(p.name for p in self.presets) or '(none)'}"
        )

    # -- resolution ------------------------------------------------------------------
    def resolve(self, preset: str | None = None, /, **values: Any) -> Params:
        """Defaults, then ``preset``, then ``values``; every value checked.

        The names in ``values`` are the result's :attr:`Params.explicit` (a preset's values are not)."""
        return self.resolve_given(preset, values, explicit=values)

    def resolve_given(self, preset: str | None, values: Mapping[str, Any], *, explicit: Iterable[str]) -> Params:
        """:meth:`resolve` with the caller's parameter names given apart from ``values`` (a compound
        routes its resolved values to a component; only those its own caller gave are explicit)."""
        owner = f"loss {self.name!r}"
        by_name = {p.name: p for p in self.params}
        unknown = [k for k in values if k not in by_name]
        if unknown:
            key = unknown[0]
            raise TypeError(
                f"{owner} got an unknown parameter {key!r}{close_matches(key, by_name)}; "
                f"valid parameters: {', '.join(by_name)}"
            )
        merged = {p.name: p.default for p in self.params}
        if preset is not None:
            merged.update(self.preset(preset).values)
        for key, value in values.items():
            merged[key] = by_name[key].convert(value, owner)
        params = Params(merged, self.name, preset, explicit)
        if self.check is not None:
            self.check(params)
        return params

    def plan(self, params: Params, registry: Any) -> LossPlan:
        """The terms a backend builds; compound losses expand into their components."""
        if not self.terms:
            return LossPlan(self.name, (PlanTerm(1.0, self, params),), params.preset)
        out: list[PlanTerm] = []
        for term in self.terms:
            component = registry.loss(term.loss)
            shared = {k: v for k, v in params.items() if k in {p.name for p in component.params}}
            # a routed value is explicit for the component where the compound's caller gave it; its defaults,
            # preset, fixed values and switches are the compound's choice
            explicit = params.explicit & set(shared)
            shared.update(term.fixed)
            explicit -= set(term.fixed)
            for switch, values in term.switches.items():
                if params[switch]:
                    shared.update(values)
                    explicit -= set(values)
            sub = component.resolve_given(None, shared, explicit=explicit)
            out.append(PlanTerm(float(params[term.weight_param]), component, sub))
        return LossPlan(self.name, tuple(out), params.preset)


def compound_params(
    components: Sequence[LossSpec], weights: Sequence[tuple[str, float, str]], overrides: Mapping[str, Param] = {}
) -> tuple[Param, ...]:
    """Parameters of a compound loss: one weight per term, then the union of the components'.

    A name shared by several components is one parameter routed to all of them (e.g.
    ``ignore_index``); its definition is taken from the first component unless
    ``overrides`` gives one.
    """
    params: list[Param] = [
        Param(name, "float", default, doc, low=0.0, examples=(0.5,)) for name, default, doc in weights
    ]
    seen = {p.name for p in params}
    for spec in components:
        for p in spec.params:
            if p.name not in seen:
                params.append(overrides.get(p.name, p))
                seen.add(p.name)
    return tuple(params)
