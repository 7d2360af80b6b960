"""Deep-supervision weights: how much each decoder output's loss counts.

``nnunet``: w_i = 1/2^i for i = 0 (full resolution) … n−1, the lowest output set to 0 (n > 1),
normalised to sum 1 (nnUNetTrainer._get_deep_supervision_scales / _build_loss).
``exp``: w_i = max(0.5^i, 0.0625), not normalised (MONAI DeepSupervisionLoss, weight_mode "exp").
``same``: 1 each (MONAI "same"). ``two``: 1, 0.5, 0.5, … (MONAI "two").
"""

from __future__ import annotations

from collections.abc import Sequence

MODES = ("nnunet", "exp", "same", "two")


def deep_supervision_weights(count: int, mode: str | Sequence[float] = "nnunet") -> tuple[float, ...]:
    """Weights for ``count`` outputs, highest resolution first."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    if not isinstance(mode, str):
        weights = tuple(float(w) for w in mode)
        if len(weights) != count:
            raise ValueError(f"weights has {len(weights)} entries for {count} outputs")
        if any(w < 0 for w in weights) or not any(weights):
            raise ValueError(f"weights must be non-negative and not all 0, got {weights}")
        return weights
    if mode == "nnunet":
        raw = [1.0 / 2**i for i in range(count)]
        if count > 1:
            raw[-1] = 0.0
        total = sum(raw)
        return tuple(w / total for w in raw)
    if mode == "exp":
        return tuple(max(0.5**i, 0.0625) for i in range(count))
    if mode == "same":
        return (1.0,) * count
    if mode == "two":
        return (1.0,) + (0.5,) * (count - 1)
    raise ValueError(f"mode must be one of {', '.join(MODES)} or a sequence of weights, got {mode!r}")
