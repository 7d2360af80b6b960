"""The built-in loss catalog, registered through the same hook a plugin uses."""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl
from ..spec import LossSpec
from . import compound, cross_entropy, distance, region, voxelwise

BUILTIN_SPECS: tuple[LossSpec, ...] = (
    *region.SPECS,
    *cross_entropy.SPECS,
    *voxelwise.SPECS,
    *distance.SPECS,
    *compound.SPECS,
)


@hookimpl
def segloss_register_losses(register: Callable[[LossSpec], None]) -> None:
    for spec in BUILTIN_SPECS:
        register(spec)
