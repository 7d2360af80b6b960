"""The ``cldice`` and ``dice_cldice`` loss specs.

clDice (Shit et al., CVPR 2021) compares soft skeletons: topology precision
Tprec = (Σ S(p)·g + s_nr)/(Σ S(p) + s_dr) and topology sensitivity
Tsens = (Σ S(g)·p + s_nr)/(Σ S(g) + s_dr), then loss = 1 − 2·Tprec·Tsens/(Tprec + Tsens + ε).
The math is one ``array_forward`` function in array-API code (``skeleton.py`` for S), so
every backend with operators (numpy reference, torch, the segloss-jax example, ...) computes
and differentiates it; the conformance kit covers it with no extra code.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from segloss_core.losses import common
from segloss_core.losses.compound import build_compound
from segloss_core.losses.formula import safe_ratio
from segloss_core.losses.region import AVERAGE, DICE, SMOOTH_DR, SMOOTH_NR
from segloss_core.spec import LossSpec, Param, Params, Preset

from .skeleton import EROSIONS, soft_skeleton

Array = Any

MONAI_16 = "Project-MONAI/MONAI monai/losses/cldice.py, v1.6.1"
MONAI_15 = "Project-MONAI/MONAI monai/losses/cldice.py, v1.5.0 (= jocpae/clDice cldice_loss/pytorch/cldice.py)"

INCLUDE_BACKGROUND = replace(
    common.INCLUDE_BACKGROUND,
    default=False,
    doc="include channel 0 (the authors and MONAI <= 1.5 drop it; a single sigmoid channel is foreground and always "
    "kept)",
)
BATCH = replace(
    common.BATCH,
    default=True,
    doc="pool the sums over the batch (and the classes) into one clDice, as the authors and MONAI <= 1.5; False: one "
    "clDice per sample (classes pooled), then the reduction over samples (MONAI >= 1.6)",
)
ITERS = Param(
    "iters",
    "int",
    3,
    "erosion iterations of the soft skeleton (MONAI iter_); should be at least the largest radius of the structures",
    low=0,
    examples=(0, 1, 6),
)
CL_SMOOTH_NR = replace(
    SMOOTH_NR, default=1.0, doc="added to the numerators of Tprec and Tsens (and of Dice)", examples=(1e-5,)
)
CL_SMOOTH_DR = replace(
    SMOOTH_DR, default=1.0, doc="added to the denominators of Tprec and Tsens (and of Dice)", examples=(1e-5,)
)
HARMONIC_EPS = Param(
    "harmonic_eps",
    "float",
    0.0,
    "added to Tprec + Tsens in the harmonic mean (MONAI >= 1.6 'smooth', 1e-4)",
    low=0.0,
    examples=(1e-4,),
)
EROSION = Param(
    "erosion",
    "choice",
    "cross",
    "soft erosion window: cross (the 3-window along each axis, then the minimum: the authors and MONAI) or box (the "
    "full 3^d window, ops.min_pool)",
    choices=EROSIONS,
)


def cldice_forward(xp: Any, ops: Any, p: Array, g: Array, w: Array, params: Params) -> Array:
    """clDice from probabilities p, target g (B, C, *S) and voxel weights w (B, 1|C, *S).

    Voxels of weight 0 (``ignore_index``, mask 0) count as background in both skeletons
    (p and g are set to 0 there) and every sum is weighted by w, so they receive no gradient.
    """
    channels = int(p.shape[1])
    if channels > 1 and not params.include_background:
        p, g = p[:, 1:], g[:, 1:]
        if int(w.shape[1]) > 1:
            w = w[:, 1:]
    keep = w > 0
    p = xp.where(keep, p, xp.zeros_like(p))
    g = xp.where(keep, g, xp.zeros_like(g))
    skel_p = soft_skeleton(xp, ops, p, params.iters, params.erosion)
    skel_g = soft_skeleton(xp, ops, g, params.iters, params.erosion)
    axes = tuple(range(1, p.ndim))  # classes and space: pooled, as the authors and MONAI
    sums = [
        xp.sum(w * skel_p * g, axis=axes),
        xp.sum(w * skel_p, axis=axes),
        xp.sum(w * skel_g * p, axis=axes),
        xp.sum(w * skel_g, axis=axes),
    ]
    if params.batch:
        sums = [xp.sum(s, axis=0, keepdims=True) for s in sums]
    hit_p, total_p, hit_g, total_g = sums
    # a zero denominator (no skeleton and smooth_dr = 0) makes the ratio vacuously 1
    precision = safe_ratio(xp, hit_p + params.smooth_nr, total_p + params.smooth_dr, 1.0)
    sensitivity = safe_ratio(xp, hit_g + params.smooth_nr, total_g + params.smooth_dr, 1.0)
    score = safe_ratio(xp, 2.0 * precision * sensitivity, precision + sensitivity + params.harmonic_eps, 0.0)
    loss = 1.0 - score  # (rows,)
    if params.reduction == "none":
        return loss[0] if params.batch else loss
    total = xp.sum(loss)
    return total if params.reduction == "sum" else total / float(loss.shape[0])


CLDICE = LossSpec(
    name="cldice",
    family="topology",
    summary="clDice (Shit et al. 2021): Dice of soft skeletons, for tubular structures (vessels, neurons, roads)",
    params=(
        common.ACTIVATION,
        INCLUDE_BACKGROUND,
        common.IGNORE_INDEX,
        BATCH,
        ITERS,
        CL_SMOOTH_NR,
        CL_SMOOTH_DR,
        HARMONIC_EPS,
        EROSION,
        common.REDUCTION,
    ),
    formula=(
        "S(x) = soft skeleton (iters erosions; cross erosion, 3^d dilation)\n"
        "Tprec = (Σ w·S(p)·g + smooth_nr) / (Σ w·S(p) + smooth_dr)   (1 where the denominator is 0)\n"
        "Tsens = (Σ w·S(g)·p + smooth_nr) / (Σ w·S(g) + smooth_dr)\n"
        "loss  = 1 − 2·Tprec·Tsens / (Tprec + Tsens + harmonic_eps)\n"
        "sums over classes (channel 0 dropped unless include_background) and voxels, per sample or pooled over the "
        "batch (batch); p and g are 0 where w = 0"
    ),
    references=(
        "Shit, Paetzold et al. clDice - a novel topology-preserving loss function for tubular structure segmentation. "
        "CVPR 2021. arXiv:2003.07311",
        "jocpae/clDice cldice_loss/pytorch/soft_skeleton.py, cldice.py",
        "MONAI SoftclDiceLoss",
    ),
    presets=(
        Preset(
            "monai",
            {"include_background": True, "batch": False, "harmonic_eps": 1e-4},
            "MONAI >= 1.6 SoftclDiceLoss(softmax=True, to_onehot_y=True) defaults: background included, one clDice per "
            "sample (classes pooled), mean over samples, smooth_nr = smooth_dr = 1, harmonic-mean epsilon 1e-4",
            MONAI_16,
        ),
        Preset(
            "monai_1_5",
            {},
            "MONAI 1.4-1.5 SoftclDiceLoss(iter_=3, smooth=1) = the authors' soft_cldice: channel 0 dropped, batch and "
            "classes pooled, no epsilon. MONAI 1.5 takes (y_true, y_pred) probabilities: use activation='none' to feed "
            "the same tensors",
            MONAI_15,
        ),
    ),
    array_forward=cldice_forward,
    notes=(
        "Differences from MONAI: MONAI 1.5 always drops channel 0, also of a single channel (its loss is then 0), "
        "segloss keeps a single sigmoid channel; MONAI works on 2D/3D only, segloss also on 1D; MONAI needs one-hot "
        "targets (to_onehot_y) and has no ignore_index/mask; at exactly tied values the erosion's gradient is split "
        "evenly here (array-API minimum) where MONAI's pooling gives it to one element (identical for continuous "
        "predictions)."
    ),
)


DICE_CLDICE = build_compound(
    "dice_cldice",
    "soft Dice + clDice (the authors' soft_dice_cldice; MONAI SoftDiceclDiceLoss)",
    [
        (DICE, "lambda_dice", 0.5, "weight of the Dice term (MONAI: 1 − alpha)"),
        (CLDICE, "lambda_cldice", 0.5, "weight of the clDice term (MONAI: alpha)"),
    ],
    presets=(
        Preset(
            "monai",
            {"include_background": True, "batch": False, "average": "macro", "harmonic_eps": 1e-4},
            "MONAI >= 1.6 SoftDiceclDiceLoss(softmax=True, to_onehot_y=True): (1 − α)·DiceLoss(smooth_nr = smooth_dr = "
            "1) + α·SoftclDiceLoss, α = 0.5",
            MONAI_16,
        ),
        Preset(
            "monai_1_5",
            {},
            "MONAI 1.4-1.5 SoftDiceclDiceLoss(iter_=3, alpha=0.5, smooth=1) = the authors' soft_dice_cldice: Dice and "
            "clDice over foreground channels, batch and classes pooled",
            MONAI_15,
        ),
    ),
    references=(
        "Shit, Paetzold et al. clDice. CVPR 2021. arXiv:2003.07311",
        "jocpae/clDice cldice_loss/pytorch/cldice.py, soft_dice_cldice",
    ),
    overrides={
        # the authors' soft_dice: one Dice over foreground classes and the whole batch, smoothing 1
        "include_background": INCLUDE_BACKGROUND,
        "batch": BATCH,
        "smooth_nr": CL_SMOOTH_NR,
        "smooth_dr": CL_SMOOTH_DR,
        "average": replace(AVERAGE, default="micro"),
    },
)

SPECS = (CLDICE, DICE_CLDICE)
