"""The per-(sample, class) statistics every region and cross-entropy loss is built from.

Notation (docs/architecture.md): ``p`` is the prediction after the activation, ``g`` the
target (one-hot of the labels, or the given soft target), ``w`` the voxel weight (0 on
voxels labelled ``ignore_index``, times the call-time ``mask``). Every statistic is a sum
over the spatial axes, one value per (sample b, class c), shape (B, C):

==================  ===============================  ==========================================
name                per-voxel term                    used by
==================  ===============================  ==========================================
intersection        w·p·g                             dice family
pred_sum            w·p                               dice family
target_sum          w·g                               dice family, CE normaliser, absent classes
pred_sq_sum         w·p²                              squared (V-Net) denominators
target_sq_sum       w·g²                              squared (V-Net) denominators
abs_diff_sum        w·|p − g|                         soft-label intersection (P + G − L1)/2
count               w                                 means over voxels (BCE, focal)
ce_pos              w·g·(−log p)                      cross-entropy / BCE positive part
ce_neg              w·(1−g)·(−log(1−p))               BCE negative part (sigmoid only)
neg_log_pred_sum    w·(−log p)                        label smoothing (softmax)
focal_pos:γ         w·g·(1−p)^γ·(−log p)              focal loss
focal_neg:γ         w·(1−g)·p^γ·(−log(1−p))           focal loss, negative part (sigmoid only)
field_pred_sum:F    w·p·F                             boundary loss (F = signed distance map)
field_sq_err_sum:F  w·(p − g)²·F                      Hausdorff-DT loss (F = d_p^α + d_g^α)
==================  ===============================  ==========================================

Fields F are per-voxel constants (B, C, *spatial) computed before the statistics by the loss
spec's ``fields`` function (no gradient flows into them).

``log p`` is computed from the logits (log-softmax / log-sigmoid), never as ``log`` of a
rounded probability. The fused kernels compute the first nine in one read of the logits.
"""

from __future__ import annotations

from typing import Any

STATISTICS: dict[str, str] = {
    "intersection": "Σ w·p·g",
    "pred_sum": "Σ w·p",
    "target_sum": "Σ w·g",
    "pred_sq_sum": "Σ w·p²",
    "target_sq_sum": "Σ w·g²",
    "abs_diff_sum": "Σ w·|p − g|",
    "count": "Σ w",
    "ce_pos": "Σ w·g·(−log p)",
    "ce_neg": "Σ w·(1−g)·(−log(1−p))",
    "neg_log_pred_sum": "Σ w·(−log p)",
}

PARAMETRIC = {
    "focal_pos": "Σ w·g·(1−p)^γ·(−log p)",
    "focal_neg": "Σ w·(1−g)·p^γ·(−log(1−p))",
}

# statistics of a per-voxel field F (a constant, e.g. a distance map) named after the colon
FIELD = {
    "field_pred_sum": "Σ w·p·F",
    "field_sq_err_sum": "Σ w·(p − g)²·F",
}

SIGMOID_ONLY = frozenset({"ce_neg", "focal_neg"})


def focal_statistic(kind: str, gamma: float) -> str:
    """Name of a focal statistic with its exponent, e.g. ``focal_pos:2.0``."""
    if kind not in PARAMETRIC:
        raise ValueError(f"unknown focal statistic {kind!r}")
    return f"{kind}:{float(gamma)!r}"


def field_statistic(kind: str, field: str) -> str:
    """Name of a field statistic, e.g. ``field_pred_sum:boundary_phi``."""
    if kind not in FIELD:
        raise ValueError(f"unknown field statistic {kind!r}")
    return f"{kind}:{field}"


def parse(name: str) -> tuple[str, Any]:
    """``'focal_pos:2.0'`` → ``('focal_pos', 2.0)``; ``'field_pred_sum:phi'`` → ``('field_pred_sum',
    'phi')``; plain names → ``(name, None)``."""
    base, sep, arg = name.partition(":")
    if sep:
        if base in PARAMETRIC:
            return base, float(arg)
        if base in FIELD:
            return base, arg
        raise ValueError(f"unknown statistic {name!r}")
    if base not in STATISTICS:
        raise ValueError(f"unknown statistic {name!r}; known: {', '.join(STATISTICS)}")
    return base, None


def describe(name: str) -> str:
    base, arg = parse(name)
    if base in FIELD:
        return FIELD[base].replace("F", arg)
    text = STATISTICS.get(base) or PARAMETRIC[base]
    return text.replace("γ", f"{arg:g}") if arg is not None else text


# Layout of the fused kernels' (B, C, 10) output (csrc/kernels/region_stats.cuh, enum Stat):
# every backend built on those kernels reads its statistics from these slots.
FUSED_SLOTS: dict[str, int] = {
    "intersection": 0,
    "pred_sum": 1,
    "target_sum": 2,
    "pred_sq_sum": 3,
    "target_sq_sum": 4,
    "abs_diff_sum": 5,
    "ce_pos": 6,
    "ce_neg": 7,
    "count": 8,
}
FUSED_INVALID_SLOT = 9  # invalid-label count, class 0 only
FUSED_NUM_SLOTS = 10
ACTIVATION_CODES: dict[str, int] = {"softmax": 0, "sigmoid": 1, "none": 2}  # enum Activation
