"""``describe(name)``: everything about a loss, as data and as text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import statistics as stat_names
from .registry import registry
from .spec import LossSpec, Param, Preset


@dataclass(frozen=True)
class ParamInfo:
    name: str
    type: str
    default: Any
    meaning: str


@dataclass(frozen=True)
class LossDescription:
    """What ``describe`` returns; ``str()`` gives the text ``segloss describe`` prints."""

    name: str
    summary: str
    kind: str
    family: str
    plugin: str
    formula: str
    parameters: tuple[ParamInfo, ...]
    presets: tuple[Preset, ...]
    statistics: tuple[str, ...]
    terms: tuple[str, ...]
    references: tuple[str, ...]
    backends: dict[str, str]
    notes: str

    def __str__(self) -> str:
        lines = [f"{self.name} — {self.summary}", f"kind: {self.kind} (plugin {self.plugin})", ""]
        lines += ["Formula:", _indent(self.formula), ""]
        if self.terms:
            lines += ["Terms:", *[f"  {t}" for t in self.terms], ""]
        if self.statistics:
            lines += ["Statistics (default parameters):"]
            lines += [f"  {name:<18} {stat_names.describe(name)}" for name in self.statistics]
            lines.append("")
        lines.append("Parameters:")
        width = max((len(p.name) for p in self.parameters), default=4)
        for p in self.parameters:
            lines.append(f"  {p.name:<{width}}  {p.type}, default {p.default!r}")
            lines.append(f"  {'':<{width}}  {p.meaning}")
        if self.presets:
            lines += ["", "Presets:"]
            for preset in self.presets:
                values = ", ".join(f"{k}={v!r}" for k, v in preset.values.items()) or "(the defaults)"
                lines.append(f"  {preset.name}: {values}")
                lines.append(f"      {preset.summary}")
                if preset.source:
                    lines.append(f"      source: {preset.source}")
        if self.references:
            lines += ["", "References:", *[f"  - {r}" for r in self.references]]
        lines += ["", "Backends:", *[f"  {name}: {state}" for name, state in self.backends.items()]]
        if self.notes:
            lines += ["", self.notes]
        return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _param_info(p: Param) -> ParamInfo:
    return ParamInfo(p.name, p.type_label(), p.default, p.doc)


def _backend_states(spec: LossSpec) -> dict[str, str]:
    reg = registry()
    states: dict[str, str] = {}
    supporting = set(reg.supporting_backends(spec))
    for info in reg.backend_infos():
        if info.broken:
            states[info.name] = f"broken ({info.reason})"
        elif info.name not in supporting:
            states[info.name] = "does not implement this loss"
        elif not info.available:
            states[info.name] = f"unavailable here ({info.reason})"
        else:
            detail = ", ".join(f"{k}: {v}" for k, v in info.status.items())
            states[info.name] = "available" + (f" ({detail})" if detail else "")
    return states


def describe(name: str) -> LossDescription:
    """Parameters (type, default, range, meaning), presets, formula, references, backends."""
    reg = registry()
    spec = reg.loss(name)
    statistics: tuple[str, ...] = ()
    if spec.kind == "statistics" and spec.required_statistics is not None:
        statistics = tuple(sorted(spec.required_statistics(spec.resolve())))
    terms = tuple(f"{t.weight_param} · {t.loss}" for t in spec.terms)
    return LossDescription(
        name=spec.name,
        summary=spec.summary,
        kind=spec.kind,
        family=spec.family,
        plugin=reg.loss_origin(name),
        formula=spec.formula,
        parameters=tuple(_param_info(p) for p in spec.params),
        presets=spec.presets,
        statistics=statistics,
        terms=terms,
        references=spec.references,
        backends=_backend_states(spec),
        notes=spec.notes,
    )
