"""segloss: one registry of segmentation losses, specified once, computed by any backend.

>>> from segloss_core import get_loss, list_losses, describe
>>> "dice" in list_losses()
True
"""

from __future__ import annotations

from .backend import API_VERSION, Backend, ConformanceDtype
from .deep_supervision import deep_supervision_weights
from .describe import LossDescription, describe
from .distance_maps import distance_map, mask_distance_map, signed_distance_map
from .explain import Explanation, explain
from .hookspecs import hookimpl, hookspec
from .lookup import compound, get_loss, list_backends, list_losses, problems
from .plugins import PluginProblem, SeglossPluginWarning
from .registry import (
    BackendInfo,
    BackendUnavailableError,
    UnknownBackendError,
    UnknownLossError,
    UnsupportedLossError,
    plugin_manager,
    registry,
)
from .spec import LossPlan, LossSpec, Param, Params, PlanTerm, Preset, Term
from .validation import PreparedInputs, validate_inputs

__version__ = "0.1.0"

__all__ = [
    "API_VERSION",
    "Backend",
    "BackendInfo",
    "BackendUnavailableError",
    "ConformanceDtype",
    "Explanation",
    "LossDescription",
    "LossPlan",
    "LossSpec",
    "Param",
    "Params",
    "PlanTerm",
    "PluginProblem",
    "PreparedInputs",
    "Preset",
    "SeglossPluginWarning",
    "Term",
    "UnknownBackendError",
    "UnknownLossError",
    "UnsupportedLossError",
    "__version__",
    "compound",
    "deep_supervision_weights",
    "describe",
    "distance_map",
    "explain",
    "get_loss",
    "hookimpl",
    "hookspec",
    "list_backends",
    "list_losses",
    "mask_distance_map",
    "plugin_manager",
    "problems",
    "registry",
    "signed_distance_map",
    "validate_inputs",
]
