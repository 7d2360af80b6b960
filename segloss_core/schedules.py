"""Weight schedules for compound losses: Kervadec et al.'s rebalancing of the boundary term.

The boundary loss is added to a region loss with a small weight that grows during training
(Kervadec et al. 2019, sec. 3.3; LIVIAETS/boundary-loss ``scheduler.py``):

    α(epoch) = min(start + step · epoch, cap)

``mode="add"``: the region weight stays 1 and the boundary weight is α (the paper's
``L_R + α·L_B``); ``mode="steal"``: the region weight is 1 − α (``StealWeight``). Note that the
recipe circulating with the seed code caps α with ``max`` where ``min`` is meant — ``max`` never
stops α from growing past the cap. segloss uses ``min``.

>>> schedule = RebalanceSchedule(start=0.01, step=0.01, cap=0.05)
>>> [round(schedule.alpha(e), 2) for e in range(7)]
[0.01, 0.02, 0.03, 0.04, 0.05, 0.05, 0.05]
>>> schedule.weights(3)
(1.0, 0.04)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RebalanceSchedule:
    start: float = 0.01
    step: float = 0.01
    cap: float = 1.0
    mode: str = "add"
    region_term: str = "generalized_dice"
    boundary_term: str = "boundary"

    def __post_init__(self) -> None:
        for name in ("start", "step", "cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"RebalanceSchedule: {name} must be a non-negative number, got {value!r}")
        if self.mode not in ("add", "steal"):
            raise ValueError(f"RebalanceSchedule: mode must be 'add' or 'steal', got {self.mode!r}")
        if self.mode == "steal" and self.cap > 1:
            raise ValueError("RebalanceSchedule: mode='steal' needs cap <= 1 (the region weight is 1 − α)")

    def alpha(self, epoch: int) -> float:
        """α at ``epoch`` (0-based): start + step · epoch, capped with min (not max)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        return min(self.start + self.step * epoch, self.cap)

    def weights(self, epoch: int) -> tuple[float, float]:
        """(region weight, boundary weight) at ``epoch``."""
        a = self.alpha(epoch)
        return (1.0 - a if self.mode == "steal" else 1.0, a)

    def apply(self, loss: Any, epoch: int) -> tuple[float, float]:
        """Set the weights of a built compound loss (e.g. ``generalized_dice_boundary``) for ``epoch``."""
        region, boundary = self.weights(epoch)
        loss.set_weights(**{self.region_term: region, self.boundary_term: boundary})
        return region, boundary
