"""The NumPy backend: segloss's float64 reference (value and exact gradient), the oracle of the
conformance suite. Not a performance target, but its speed is the test suite's speed."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from .common import SEED, Benchmark, label_map

LOSSES = ["dice", "dice_ce", "generalized_dice", "tversky", "boundary", "hausdorff_dt"]


class LossReferenceCPU(Benchmark):
    """Seconds for value_and_grad of ``get_loss(name, backend="numpy")`` at 2×4×64³ (float64)."""

    version = "1"
    params: ClassVar[list] = [LOSSES]
    param_names: ClassVar[list] = ["loss"]
    shape = (2, 4, 64, 64, 64)

    def setup(self, cache, loss):
        if getattr(self, "_key", None) == loss:
            return
        from segloss_core import get_loss

        b, c, *spatial = self.shape
        self.labels = np.stack([label_map(tuple(spatial), c, SEED + i) for i in range(b)]).astype(np.int64)
        rng = np.random.default_rng(SEED)
        self.logits = rng.standard_normal(self.shape)
        channel = self.labels[:, None]
        np.put_along_axis(self.logits, channel, 3.0 + np.take_along_axis(self.logits, channel, 1), 1)
        self.loss = get_loss(loss, backend="numpy")
        self._key = loss

    def time_value_and_grad(self, cache, loss):
        self.loss.value_and_grad(self.logits, self.labels)
