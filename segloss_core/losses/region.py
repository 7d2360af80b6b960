"""Region (overlap) losses: dice, jaccard, tversky, focal_tversky, generalized_dice.

All are formulas of the per-(sample, class) statistics I = Σ w·p·g, P = Σ w·p (or Σ w·p²)
and G = Σ w·g (or Σ w·g²); one pipeline serves them all, so a parameter means the same in
each:

1. ``squared`` swaps P, G for Σp², Σg² (V-Net); ``soft_intersection`` replaces I by
   (P + G − Σ|p − g|)/2, which equals Σp·g for one-hot targets and makes the loss minimal at
   p = g for soft targets (Wang & Blaschko, JDT losses; MONAI ``soft_label``).
2. ``batch`` sums I, P, G over the batch (one row) instead of one row per sample.
3. classes are selected (``include_background``/``classes``); ``average="micro"`` sums
   them into one pooled class (Keras/ivadomed flatten everything); there ``class_weights``
   scale each class's p and g before pooling (kornia's micro weights: Σp·g by w², Σp, Σg by w).
4. score = numerator / max(denominator, ``clamp_dr``); where the denominator is exactly 0
   the score is ``zero_division`` (and the gradient 0).
5. loss = 1 − score, −score or −log(max(score, 1e-7)) (``loss_form``); focal_tversky raises
   it to ``gamma``.
6. classes absent from the target (G = 0 in the row): ``absent_classes="smooth"`` leaves
   them to the smoothing terms, ``"zero"`` sets their loss to 0 but keeps them in the
   mean (SMP), ``"exclude"`` drops them from the mean.
7. weighted reduction: Σ w_c·L / normaliser, with the normaliser given by
   ``class_weight_normalization`` (number of counted elements, Σ of their weights, or the
   number of rows), and ``count_excluded_classes`` counting excluded channels in the
   number of classes (diceloss_cpp's ``ignore_channel``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from ..spec import LossSpec, Param, Params, Preset
from . import common
from .formula import constant_vector, full, included_classes, safe_ratio, select_columns

Array = Any
LOG_SCORE_FLOOR = 1e-7  # −log(max(score, 1e-7)), as segmentation_models_pytorch's log_loss

# ---------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------
SMOOTH_NR = Param("smooth_nr", "float", 1e-5, "added to the numerator", low=0.0, examples=(1.0, 0.0))
SMOOTH_DR = Param("smooth_dr", "float", 1e-5, "added to the denominator", low=0.0, examples=(1.0, 0.0))
CLAMP_DR = Param(
    "clamp_dr",
    "float",
    0.0,
    "lower bound of the denominator after smoothing (nnU-Net clips at 1e-8)",
    low=0.0,
    examples=(1e-8,),
)
SQUARED = Param("squared", "bool", False, "squares in the denominator: Σp² + Σg² (V-Net, Milletari et al. 2016)")
SOFT_INTERSECTION = Param(
    "soft_intersection",
    "bool",
    False,
    "I = (Σp + Σg − Σ|p − g|)/2: equal to Σp·g for one-hot targets, correct for soft targets (MONAI soft_label)",
)
AVERAGE = Param(
    "average",
    "choice",
    "macro",
    "macro: one score per class, then averaged; micro: classes pooled into one score (Keras/ivadomed flatten; "
    "class_weights then scale p and g of each class before pooling, as kornia)",
    choices=("macro", "micro"),
)
CLASS_WEIGHT_NORMALIZATION = Param(
    "class_weight_normalization",
    "choice",
    "count",
    "mean over classes divides Σ w_c·L_c by: count (number of counted elements, MONAI), weight_sum "
    "(Σ w_c, kornia/SMP class_weights) or rows (number of rows: Σ_c w_c·L_c per sample, diceloss_cpp)",
    choices=("count", "weight_sum", "rows"),
)
ABSENT_CLASSES = Param(
    "absent_classes",
    "choice",
    "smooth",
    "classes with no target voxels in a row: smooth (no special case: the smoothing decides), zero (loss 0 "
    "but counted in the mean, SMP) or exclude (dropped from the mean)",
    choices=("smooth", "zero", "exclude"),
)
COUNT_EXCLUDED_CLASSES = Param(
    "count_excluded_classes",
    "bool",
    False,
    "count channels left out by include_background/classes in the mean's denominator, with loss 0 "
    "(diceloss_cpp ignore_channel)",
)
ZERO_DIVISION = Param(
    "zero_division",
    "float",
    1.0,
    "score where the denominator is exactly 0 (nothing predicted, nothing to find, no smoothing)",
    low=0.0,
    high=1.0,
    examples=(0.0,),
)
LOSS_FORM = Param(
    "loss_form",
    "choice",
    "one_minus",
    "one_minus: 1 − score (MONAI); negative: −score (nnU-Net); negative_log: −log(max(score, 1e-7)) (SMP log_loss)",
    choices=("one_minus", "negative", "negative_log"),
)
LOG_LOSS = Param("log_loss", "bool", False, "shorthand for loss_form='negative_log' (the SMP name)")
ALPHA = Param("alpha", "float", 0.5, "weight of false positives FP = P − I", low=0.0, examples=(0.3,))
BETA = Param("beta", "float", 0.5, "weight of false negatives FN = G − I", low=0.0, examples=(0.7,))
FOCAL_GAMMA = Param(
    "gamma",
    "float",
    0.75,
    "exponent of the per-class loss (1 − TI)^gamma; 0.75 = 1/(4/3) as Abraham & Khan 2019",
    low=0.0,
    low_open=True,
    examples=(2.0,),
)
WEIGHT_TYPE = Param(
    "weight_type",
    "choice",
    "square",
    "class weight from target volume: square 1/G², simple 1/G, uniform 1 (Sudre et al. 2017)",
    choices=("square", "simple", "uniform"),
)

COMMON = (
    common.ACTIVATION,
    common.INCLUDE_BACKGROUND,
    common.CLASSES,
    common.IGNORE_INDEX,
    common.BATCH,
    SMOOTH_NR,
    SMOOTH_DR,
    CLAMP_DR,
    SOFT_INTERSECTION,
    AVERAGE,
    common.CLASS_WEIGHTS,
    CLASS_WEIGHT_NORMALIZATION,
    ABSENT_CLASSES,
    COUNT_EXCLUDED_CLASSES,
    ZERO_DIVISION,
    LOSS_FORM,
    LOG_LOSS,
    common.REDUCTION,
    common.REGIONS,
)


# ---------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------
def statistics_needed(params: Params) -> frozenset[str]:
    if params.get("squared"):
        return frozenset({"intersection", "pred_sq_sum", "target_sq_sum"})
    needed = {"pred_sum", "target_sum"}
    needed.add("abs_diff_sum" if params.soft_intersection else "intersection")
    return frozenset(needed)


def overlap_terms(xp: Any, stats: Mapping[str, Array], params: Params) -> tuple[Array, Array, Array]:
    """(I, P, G) per (row, class): batch-summed if ``batch``, before class selection."""
    if params.get("squared"):
        intersection, pred, target = stats["intersection"], stats["pred_sq_sum"], stats["target_sq_sum"]
    else:
        pred, target = stats["pred_sum"], stats["target_sum"]
        if params.soft_intersection:
            intersection = (pred + target - stats["abs_diff_sum"]) * 0.5
        else:
            intersection = stats["intersection"]
    if params.batch:
        intersection, pred, target = (xp.sum(v, axis=0, keepdims=True) for v in (intersection, pred, target))
    return intersection, pred, target


_MICRO_WEIGHT_POWER = {
    "intersection": 2,
    "pred_sum": 1,
    "target_sum": 1,
    "pred_sq_sum": 2,
    "target_sq_sum": 2,
    "abs_diff_sum": 1,
}


def micro_class_weighted(xp: Any, stats: Mapping[str, Array], weights: tuple[float, ...]) -> dict[str, Array]:
    """Class weights under ``average="micro"``, as kornia's ``dice_loss(average="micro", weight=w)``:
    w_c multiplies p_c and g_c before the classes are pooled, so Σp·g (and Σp², Σg²) scale by w_c²
    and Σp, Σg, Σ|p − g| by w_c (kornia/losses/dice.py, v0.9.0rc1 b4f5a78)."""
    out = dict(stats)
    for name, power in _MICRO_WEIGHT_POWER.items():
        if name in stats:
            w = xp.reshape(constant_vector(xp, stats[name], [float(v) ** power for v in weights]), (1, -1))
            out[name] = stats[name] * w
    return out


def loss_from_score(xp: Any, score: Array, params: Params) -> Array:
    form = "negative_log" if params.get("log_loss") else params.loss_form
    if form == "one_minus":
        return 1.0 - score
    if form == "negative":
        return -score
    return -xp.log(xp.maximum(score, full(xp, score, LOG_SCORE_FLOOR)))


def score_from_parts(xp: Any, numerator: Array, denominator: Array, params: Params) -> Array:
    if params.clamp_dr > 0:
        denominator = xp.maximum(denominator, full(xp, denominator, params.clamp_dr))
    return safe_ratio(xp, numerator, denominator, params.zero_division)


def reduce_class_losses(
    xp: Any, loss: Array, present: Array, columns: list[int], num_classes: int, params: Params
) -> Array:
    """Weighted reduction of a (rows, K) loss over rows and the K included classes."""
    counted = xp.ones_like(loss)
    policy = params.get("absent_classes", "smooth")
    if policy != "smooth":
        loss = xp.where(present, loss, xp.zeros_like(loss))
        if policy == "exclude":
            counted = xp.where(present, counted, xp.zeros_like(counted))
    weights = params.get("class_weights")
    if weights is not None:
        w = xp.reshape(constant_vector(xp, loss, [weights[c] for c in columns]), (1, -1))
        weighted = loss * w
        counted_weight = counted * w
    else:
        weighted = loss
        counted_weight = counted
    reduction = params.get("reduction", "mean")
    if reduction == "none":
        return weighted[0] if params.get("batch") else weighted
    total = xp.sum(weighted)
    if reduction == "sum":
        return total
    mode = params.get("class_weight_normalization", "count")
    if mode == "rows":
        normaliser = full(xp, total, float(loss.shape[0]))
    elif mode == "weight_sum":
        normaliser = xp.sum(counted_weight)
    else:
        normaliser = xp.sum(counted)
        if params.get("count_excluded_classes") and len(columns) < num_classes:
            normaliser = normaliser + float((num_classes - len(columns)) * loss.shape[0])
    return safe_ratio(xp, total, normaliser, 0.0)


def region_formula(
    score_parts: Callable[[Any, Array, Array, Array, Params], tuple[Array, Array]],
    power: Callable[[Params], float] | None = None,
) -> Callable[[Any, Mapping[str, Array], Params], Array]:
    """Build a ``from_statistics`` function from a (numerator, denominator) rule."""

    def formula(xp: Any, stats: Mapping[str, Array], params: Params) -> Array:
        if params.average == "micro" and params.get("class_weights") is not None:
            stats = micro_class_weighted(xp, stats, params.class_weights)
        intersection, pred, target = overlap_terms(xp, stats, params)
        num_classes = int(intersection.shape[1])
        columns = included_classes(params, num_classes)
        intersection, pred, target = (select_columns(xp, v, columns) for v in (intersection, pred, target))
        if params.average == "micro":
            intersection, pred, target = (xp.sum(v, axis=1, keepdims=True) for v in (intersection, pred, target))
        present = target > 0
        numerator, denominator = score_parts(xp, intersection, pred, target, params)
        loss = loss_from_score(xp, score_from_parts(xp, numerator, denominator, params), params)
        if power is not None:
            loss = safe_power(xp, loss, power(params))
        if params.average == "micro":
            return _reduce_rows(xp, loss[:, 0], params)
        return reduce_class_losses(xp, loss, present, columns, num_classes, params)

    return formula


def safe_power(xp: Any, base: Array, exponent: float) -> Array:
    """max(base, 0)^exponent with a zero (not infinite) gradient at base <= 0 for exponent < 1."""
    positive = base > 0
    safe_base = xp.where(positive, base, xp.ones_like(base))
    return xp.where(positive, safe_base**exponent, xp.zeros_like(base))


def _reduce_rows(xp: Any, loss: Array, params: Params) -> Array:
    reduction = params.get("reduction", "mean")
    if reduction == "none":
        return loss[0] if params.get("batch") else loss
    total = xp.sum(loss)
    return total if reduction == "sum" else total / float(loss.shape[0])


def _dice_parts(xp: Any, i: Array, p: Array, g: Array, params: Params) -> tuple[Array, Array]:
    return 2.0 * i + params.smooth_nr, p + g + params.smooth_dr


def _jaccard_parts(xp: Any, i: Array, p: Array, g: Array, params: Params) -> tuple[Array, Array]:
    return i + params.smooth_nr, p + g - i + params.smooth_dr


def _tversky_parts(xp: Any, i: Array, p: Array, g: Array, params: Params) -> tuple[Array, Array]:
    return i + params.smooth_nr, i + params.alpha * (p - i) + params.beta * (g - i) + params.smooth_dr


def check_region(params: Params) -> None:
    if params.get("log_loss") and params.loss_form not in ("one_minus", "negative_log"):
        raise ValueError(
            f"loss {params.loss!r}: log_loss=True means loss_form='negative_log', but loss_form="
            f"{params.loss_form!r} was given; set only one of them"
        )
    if params.average == "micro" and params.absent_classes != "smooth":
        raise ValueError(f"loss {params.loss!r}: absent_classes applies to average='macro' only")
    common.check_class_selection(params)


# ---------------------------------------------------------------------------------------
# presets (sources read: see docs/conventions.md)
# ---------------------------------------------------------------------------------------
DICE_PRESETS = (
    Preset(
        "monai",
        {},
        "MONAI DiceLoss(softmax=True, to_onehot_y=True) defaults: 1 − (2I + 1e-5)/(P + G + 1e-5), per sample, "
        "background included, mean over B×C",
        "Project-MONAI/MONAI monai/losses/dice.py, DiceLoss, v1.5.0 (unchanged in 1.6.1)",
    ),
    Preset(
        "nnunet",
        {
            "include_background": False,
            "smooth_nr": 1e-5,
            "smooth_dr": 1e-5,
            "clamp_dr": 1e-8,
            "loss_form": "negative",
        },
        "nnU-Net v2 default trainer: MemoryEfficientSoftDiceLoss(smooth=1e-5, do_bg=False), "
        "−(2I + 1e-5)/max(P + G + 1e-5, 1e-8); pass batch=True for batch_dice plans",
        "MIC-DKFZ/nnUNet nnunetv2/training/loss/dice.py + nnUNetTrainer._build_loss, v2.8.1 (0e49508)",
    ),
    Preset(
        "nnunet_nosmooth",
        {
            "include_background": False,
            "smooth_nr": 0.0,
            "smooth_dr": 0.0,
            "clamp_dr": 1e-8,
            "loss_form": "negative",
        },
        "nnUNetTrainerDiceCELoss_noSmooth's Dice: −2I/max(P + G, 1e-8)",
        "MIC-DKFZ/nnUNet nnunetv2/training/nnUNetTrainer/variants/loss/nnUNetTrainerDiceLoss.py, v2.8.1",
    ),
    Preset(
        "nnunet_regions",
        {
            "activation": "sigmoid",
            "include_background": True,
            "smooth_nr": 1e-5,
            "smooth_dr": 1e-5,
            "clamp_dr": 1e-8,
            "loss_form": "negative",
        },
        "nnU-Net v2 region-based training (BraTS/KiTS): MemoryEfficientSoftDiceLoss(apply_nonlin=sigmoid, do_bg=True, "
        "smooth=1e-5) on every region channel, −(2I + 1e-5)/max(P + G + 1e-5, 1e-8); pass regions= (e.g. "
        "((1, 2, 3), (2, 3), (3,))) and batch=True for batch_dice plans",
        "MIC-DKFZ/nnUNet nnunetv2/training/loss/dice.py + nnUNetTrainer._build_loss (label_manager.has_regions), "
        "v2.8.1 (0e49508)",
    ),
    Preset(
        "smp",
        {
            "batch": True,
            "smooth_nr": 0.0,
            "smooth_dr": 0.0,
            "clamp_dr": 2e-7,
            "soft_intersection": True,
            "absent_classes": "zero",
        },
        "segmentation_models_pytorch >= 0.4 DiceLoss(mode='multiclass'): batch-global "
        "(I + 0)/max(½(P + G) + 0, 1e-7) with the soft (L1) intersection, absent classes zeroed but counted",
        "qubvel-org/segmentation_models.pytorch segmentation_models_pytorch/losses/{dice.py,_functional.py}, v0.5.0",
    ),
    Preset(
        "keras",
        {
            "activation": "sigmoid",
            "batch": True,
            "average": "micro",
            "smooth_nr": 1.0,
            "smooth_dr": 1.0,
            "loss_form": "negative",
        },
        "the classic Keras recipe: dice_coef over everything flattened, (2I + 1)/(P + G + 1), loss −dice_coef "
        "(single sigmoid output channel); '1 - dice_coef' variants have the same gradient",
        "jocicmarko/ultrasound-nerve-segmentation train.py (df9eb77) = keras-team/keras issue #3611",
    ),
    Preset(
        "ivadomed",
        {
            "activation": "sigmoid",
            "batch": True,
            "average": "micro",
            "smooth_nr": 1.0,
            "smooth_dr": 1.0,
            "loss_form": "negative",
        },
        "ivadomed DiceLoss: everything flattened (batch, channels, space), −(2I + 1)/(P + G + 1); the models "
        "end in a sigmoid",
        "ivadomed/ivadomed ivadomed/losses.py, DiceLoss(smooth=1.0), v2.9.10 (46248ae8)",
    ),
    Preset(
        "vnet",
        {"squared": True, "smooth_nr": 0.0, "smooth_dr": 1e-5, "include_background": False},
        "V-Net eq. (1) as a soft loss: 1 − 2Σpg/(Σp² + Σg² + 1e-5) on the foreground channel(s), per sample. "
        "(The original Caffe layer's forward pass is the hard Dice; its backward implements this squared form.)",
        "Milletari, Navab & Ahmadi, V-Net (3DV 2016), eq. (1)-(2); faustomilletari/VNet pyLayer.py DiceLoss",
    ),
    Preset(
        "isensee2017",
        {"smooth_nr": 0.0, "smooth_dr": 1e-6, "loss_form": "negative", "include_background": False},
        "Isensee et al. 2017 (BraTS) multi-class soft Dice: −mean over (sample, foreground class) of "
        "2I/(P + G + 1e-6) (1e-7 in that code base is the validation metric's, not the loss's)",
        "MIC-DKFZ/BraTS2017 soft_dice_per_img_in_batch (Lasagne/Theano); Isensee et al., BrainLes 2017, eq. (1)",
    ),
    Preset(
        "diceloss_cpp",
        {
            "smooth_nr": 0.0,
            "smooth_dr": 0.0,
            "zero_division": 1.0,
            "count_excluded_classes": True,
        },
        "nslay/diceloss_cpp DiceLoss() for C >= 2 softmax channels: 1 − 2I/(P + G), loss 0 where P + G = 0, "
        "mean over all C channels (an excluded channel, its ignore_channel, counts with loss 0). Its C = 1 "
        "path (two pseudo-channels 1 − s, s) has no preset",
        "nslay/diceloss_cpp DiceLoss.py + diceloss.cpp (44ab05a)",
    ),
    Preset(
        "boundary_loss",
        {"smooth_nr": 1e-10, "smooth_dr": 1e-10, "activation": "softmax"},
        "LIVIAETS/boundary-loss DiceLoss: 1 − (2I + 1e-10)/(P + G + 1e-10), mean over B×idc",
        "LIVIAETS/boundary-loss losses.py, DiceLoss (171c32d)",
    ),
)

_REF_MONAI = "MONAI DiceLoss: https://docs.monai.io/en/stable/losses.html#diceloss"
_REF_MILLETARI = "Milletari, Navab, Ahmadi. V-Net. 3DV 2016. arXiv:1606.04797"
_REF_SUDRE = "Sudre et al. Generalised Dice overlap as a deep learning loss function. DLMIA 2017. arXiv:1707.03237"
_REF_SALEHI = "Salehi, Erdogmus, Gholipour. Tversky loss function for image segmentation. MLMI 2017. arXiv:1706.05721"
_REF_ABRAHAM = "Abraham, Khan. A novel focal Tversky loss function. ISBI 2019. arXiv:1810.07842"
_REF_JDT = "Wang, Blaschko. Jaccard metric losses: optimizing the Jaccard index with soft labels. NeurIPS 2023"
_REF_ISENSEE = "Isensee et al. nnU-Net. Nature Methods 18, 203-211 (2021)"

_PIPELINE_TEXT = (
    "I, P, G per (sample, class) [per class if batch]; P, G = Σp², Σg² if squared; "
    "I = (P + G − Σ|p−g|)/2 if soft_intersection; score = num / max(den, clamp_dr) "
    "(zero_division where den = 0); loss = 1 − score | −score | −log(max(score, 1e-7)); "
    "absent classes per absent_classes; weighted mean Σ w_c L / normaliser (class_weight_normalization)."
)

DICE = LossSpec(
    name="dice",
    family="region",
    summary="Soft Dice loss: one parameterised core reproducing MONAI, nnU-Net, SMP, Keras and more",
    params=(*COMMON[:8], SQUARED, *COMMON[8:]),
    formula="score = (2·I + smooth_nr) / max(P + G + smooth_dr, clamp_dr).  " + _PIPELINE_TEXT,
    references=(_REF_MILLETARI, _REF_ISENSEE, _REF_JDT, _REF_MONAI),
    presets=DICE_PRESETS,
    required_statistics=statistics_needed,
    from_statistics=region_formula(_dice_parts),
    check=check_region,
)

JACCARD = LossSpec(
    name="jaccard",
    family="region",
    summary="Soft Jaccard (IoU) loss",
    params=(*COMMON[:8], SQUARED, *COMMON[8:]),
    formula="score = (I + smooth_nr) / max(P + G − I + smooth_dr, clamp_dr).  "
    + _PIPELINE_TEXT
    + "  MONAI DiceLoss(jaccard=True) = this with smooth_nr/2, smooth_dr/2.",
    references=(_REF_JDT, "Rahman, Wang. Optimizing intersection-over-union in deep neural networks. ISVC 2016"),
    presets=(
        Preset(
            "smp",
            {
                "batch": True,
                "smooth_nr": 0.0,
                "smooth_dr": 0.0,
                "clamp_dr": 1e-7,
                "soft_intersection": True,
                "absent_classes": "zero",
            },
            "segmentation_models_pytorch >= 0.4 JaccardLoss(mode='multiclass'): (I + 0)/max(U + 0, 1e-7), batch-global",
            "qubvel-org/segmentation_models.pytorch segmentation_models_pytorch/losses/jaccard.py, v0.5.0",
        ),
    ),
    required_statistics=statistics_needed,
    from_statistics=region_formula(_jaccard_parts),
    check=check_region,
)

TVERSKY = LossSpec(
    name="tversky",
    family="region",
    summary="Tversky loss: asymmetric weights of false positives (alpha) and false negatives (beta)",
    params=(*COMMON, ALPHA, BETA),
    formula="score = (I + smooth_nr) / max(I + alpha·(P − I) + beta·(G − I) + smooth_dr, clamp_dr).  "
    + _PIPELINE_TEXT
    + "  alpha = beta = 0.5 is Dice, alpha = beta = 1 is Jaccard.",
    references=(_REF_SALEHI, "MONAI TverskyLoss"),
    presets=(
        Preset(
            "monai",
            {},
            "MONAI TverskyLoss defaults (alpha = beta = 0.5, smoothing 1e-5)",
            "Project-MONAI/MONAI monai/losses/tversky.py, v1.5.0",
        ),
        Preset(
            "salehi2017",
            {"alpha": 0.3, "beta": 0.7},
            "alpha = 0.3, beta = 0.7 (Salehi et al. 2017)",
            "arXiv:1706.05721",
        ),
    ),
    required_statistics=statistics_needed,
    from_statistics=region_formula(_tversky_parts),
    check=check_region,
)

FOCAL_TVERSKY = LossSpec(
    name="focal_tversky",
    family="region",
    summary="Focal Tversky loss: (1 − Tversky index)^gamma per class",
    params=(
        *COMMON,
        # Abraham & Khan weight false negatives by 0.7 (their alpha); here alpha is always the FP weight
        replace(ALPHA, default=0.3, examples=(0.5,)),
        replace(BETA, default=0.7, examples=(0.5,)),
        FOCAL_GAMMA,
    ),
    formula="loss_c = max(1 − TI_c, 0)^gamma with TI as tversky (gradient 0 where 1 − TI_c = 0).  " + _PIPELINE_TEXT,
    references=(_REF_ABRAHAM,),
    presets=(
        Preset(
            "abraham2019",
            {
                "activation": "sigmoid",
                "batch": True,
                "average": "micro",
                "alpha": 0.3,
                "beta": 0.7,
                "gamma": 0.75,
                "smooth_nr": 1.0,
                "smooth_dr": 1.0,
            },
            "Abraham & Khan 2019 focal_tversky: everything flattened (single sigmoid channel), "
            "TI = (TP + 1)/(TP + 0.7·FN + 0.3·FP + 1), loss (1 − TI)^0.75 (their gamma 4/3 as the exponent 1/gamma); "
            "their alpha = 0.7 weights false negatives, which is beta here",
            "arXiv:1810.07842; nabsabraham/focal-tversky-unet losses.py (tversky, focal_tversky)",
        ),
    ),
    required_statistics=statistics_needed,
    from_statistics=region_formula(_tversky_parts, power=lambda params: params.gamma),
    check=lambda params: _check_focal_tversky(params),
)


def _check_focal_tversky(params: Params) -> None:
    check_region(params)
    if params.loss_form != "one_minus" or params.log_loss:
        raise ValueError("loss 'focal_tversky': loss_form must be 'one_minus' (the power applies to 1 − TI)")


# ---------------------------------------------------------------------------------------
# generalized dice
# ---------------------------------------------------------------------------------------
def _generalized_dice(xp: Any, stats: Mapping[str, Array], params: Params) -> Array:
    intersection, pred, target = overlap_terms(xp, stats, params)
    columns = included_classes(params, int(intersection.shape[1]))
    intersection, pred, target = (select_columns(xp, v, columns) for v in (intersection, pred, target))
    if params.weight_type == "uniform":
        weights = xp.ones_like(target)
    else:
        volume = target if params.weight_type == "simple" else target * target
        empty = volume == 0
        raw = safe_ratio(xp, xp.ones_like(volume), volume, 0.0)
        # MONAI: an absent class (infinite weight) gets the largest finite weight of its row
        row_max = xp.max(raw, axis=1, keepdims=True)
        weights = xp.where(empty, xp.broadcast_to(row_max, raw.shape), raw)
    numerator = 2.0 * xp.sum(weights * intersection, axis=1) + params.smooth_nr
    denominator = xp.sum(weights * (pred + target), axis=1) + params.smooth_dr
    loss = loss_from_score(xp, score_from_parts(xp, numerator, denominator, params), params)
    return _reduce_rows(xp, loss, params)


def _check_generalized(params: Params) -> None:
    if params.get("log_loss") and params.loss_form not in ("one_minus", "negative_log"):
        raise ValueError("loss 'generalized_dice': set only one of log_loss and loss_form")
    common.check_class_selection(params)


GENERALIZED_DICE = LossSpec(
    name="generalized_dice",
    family="region",
    summary="Generalised Dice (Sudre et al. 2017): classes pooled with inverse-volume weights",
    params=(
        common.ACTIVATION,
        common.INCLUDE_BACKGROUND,
        common.CLASSES,
        common.IGNORE_INDEX,
        common.BATCH,
        SMOOTH_NR,
        SMOOTH_DR,
        CLAMP_DR,
        SOFT_INTERSECTION,
        WEIGHT_TYPE,
        ZERO_DIVISION,
        LOSS_FORM,
        LOG_LOSS,
        common.REDUCTION,
        common.REGIONS,
    ),
    formula="w_c = 1/G_c² (square) | 1/G_c (simple) | 1 (uniform), an absent class taking the row's largest weight "
    "(MONAI); score = (2 Σ_c w_c I_c + smooth_nr) / max(Σ_c w_c (P_c + G_c) + smooth_dr, clamp_dr) per sample, "
    "or once over the whole batch if batch (weights from batch volumes, so they do not cancel); loss as dice.",
    references=(_REF_SUDRE, "MONAI GeneralizedDiceLoss (issues #6765, #4656 for batch mode and infinite weights)"),
    presets=(
        Preset(
            "monai",
            {},
            "MONAI GeneralizedDiceLoss(softmax=True, to_onehot_y=True) defaults",
            "Project-MONAI/MONAI monai/losses/dice.py, GeneralizedDiceLoss, v1.5.0",
        ),
    ),
    required_statistics=statistics_needed,
    from_statistics=_generalized_dice,
    check=_check_generalized,
)

SPECS = (DICE, JACCARD, TVERSKY, FOCAL_TVERSKY, GENERALIZED_DICE)
