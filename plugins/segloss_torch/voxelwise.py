"""Torch implementations of the voxelwise losses (those not computed from statistics)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from segloss_core.spec import Params
from segloss_core.validation import PreparedInputs

VoxelwiseFn = Callable[[PreparedInputs, Params, Mapping[str, Any]], torch.Tensor]
IMPLEMENTATIONS: dict[str, VoxelwiseFn] = {}


def evaluate(name: str, prepared: PreparedInputs, params: Params, inputs: Mapping[str, Any]) -> torch.Tensor:
    return IMPLEMENTATIONS[name](prepared, params, inputs)
