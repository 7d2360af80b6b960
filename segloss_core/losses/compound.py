"""Compound losses: weighted sums of registered losses, built by one mechanism.

``dice_ce`` is not a class: it is ``Term("dice", "lambda_dice") + Term("cross_entropy",
"lambda_ce")``. A compound's parameters are the term weights plus the union of its
components' parameters; a name several components share (``activation``,
``ignore_index``, ``class_weights``, ``reduction``) is one parameter routed to all of them,
as MONAI's DiceCELoss shares ``weight``. Backends evaluate all statistics-based terms from
one pass of statistics (the fused path reads the logits once for Dice and CE).

For an ad-hoc sum with different parameters per term use
:func:`segloss_core.compound` (e.g. two Dice terms with different smoothing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..spec import LossSpec, Param, Params, Preset, Term, compound_params
from . import common
from .cross_entropy import CROSS_ENTROPY, FOCAL
from .distance import BOUNDARY
from .region import DICE, GENERALIZED_DICE
from .voxelwise import TOPK_CE

COMPOUND_REDUCTION = replace(common.REDUCTION, choices=("mean", "sum"), doc="mean or sum, applied to every term")
VOXELWISE_COMPOUND_REDUCTION = replace(
    common.REDUCTION,
    doc="mean or sum, applied to every term; none: the focal map (B, K, *spatial) plus the Dice (B, K) values "
    "broadcast over it, as MONAI DiceFocalLoss(reduction='none') (focal with activation='sigmoid' or "
    "channel_mean)",
)


def build_compound(
    name: str,
    summary: str,
    components: Sequence[tuple[LossSpec, str, float, str]],
    *,
    presets: Sequence[Preset] = (),
    references: Sequence[str] = (),
    overrides: Mapping[str, Param] | None = None,
) -> LossSpec:
    """A compound spec from (component spec, weight parameter, default weight, doc) rows."""
    specs = [c[0] for c in components]
    params = compound_params(
        specs,
        [(weight_param, default, doc) for _, weight_param, default, doc in components],
        {"reduction": COMPOUND_REDUCTION, **(overrides or {})},
    )
    formula = " + ".join(f"{weight_param}·{spec.name}" for spec, weight_param, _, _ in components)

    def check(resolved: Params) -> None:
        for spec in specs:
            own = {p.name for p in spec.params}
            sub = Params({k: v for k, v in resolved.items() if k in own}, spec.name, None, resolved.explicit & own)
            if spec.check is not None:
                spec.check(sub)

    return LossSpec(
        name=name,
        family="compound",
        summary=summary,
        params=params,
        formula=formula + "  (shared parameters routed to every component that has them)",
        references=tuple(references),
        presets=tuple(presets),
        terms=tuple(Term(spec.name, weight_param) for spec, weight_param, _, _ in components),
        check=check,
        call_inputs=tuple(dict.fromkeys(n for spec in specs for n in spec.call_inputs)),
    )


def merge_presets(*values: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for v in values:
        merged.update(v)
    merged.update(extra)
    return merged


DICE_CE = build_compound(
    "dice_ce",
    "Dice + cross-entropy (MONAI DiceCELoss, nnU-Net DC_and_CE_loss)",
    [
        (DICE, "lambda_dice", 1.0, "weight of the Dice term"),
        (CROSS_ENTROPY, "lambda_ce", 1.0, "weight of the cross-entropy term"),
    ],
    presets=(
        Preset(
            "monai",
            {},
            "MONAI DiceCELoss(softmax=True, to_onehot_y=True) defaults",
            "Project-MONAI/MONAI monai/losses/dice.py, DiceCELoss, v1.5.0",
        ),
        Preset(
            "nnunet",
            merge_presets(DICE.preset("nnunet").values),
            "nnU-Net v2 DC_and_CE_loss as nnUNetTrainer builds it: CE + (−Dice), smooth 1e-5, no background; "
            "ignore_index honoured by both terms; batch=True for batch_dice plans",
            "MIC-DKFZ/nnUNet nnunetv2/training/loss/compound_losses.py + nnUNetTrainer._build_loss, v2.8.1",
        ),
        Preset(
            "nnunet_regions",
            merge_presets(DICE.preset("nnunet_regions").values, binary_mean="nnunet"),
            "nnU-Net v2 region-based training, DC_and_BCE_loss as nnUNetTrainer builds it for BraTS/KiTS: "
            "BCEWithLogits + (−Dice) on sigmoid region channels, Dice smooth 1e-5 with every region; with "
            "ignore_index the BCE is Σ mask·bce / Σ mask over voxels (use_ignore_label=True). Pass regions= and "
            "batch=True for batch_dice plans",
            "MIC-DKFZ/nnUNet nnunetv2/training/loss/compound_losses.py DC_and_BCE_loss + nnUNetTrainer._build_loss, "
            "v2.8.1 (0e49508)",
        ),
        Preset(
            "nnunet_nosmooth",
            merge_presets(DICE.preset("nnunet_nosmooth").values),
            "nnUNetTrainerDiceCELoss_noSmooth: CE + (−2I/max(P + G, 1e-8))",
            "MIC-DKFZ/nnUNet nnunetv2/training/nnUNetTrainer/variants/loss/nnUNetTrainerDiceLoss.py, v2.8.1",
        ),
    ),
    references=("Isensee et al. nnU-Net. Nature Methods 2021", "MONAI DiceCELoss"),
)

SIGMOID_FOCAL = Param(
    "sigmoid_focal",
    "bool",
    False,
    "the focal term applies a sigmoid to the logits whatever the Dice term's activation (MONAI "
    "DiceFocalLoss(softmax=True) does: softmax Dice + sigmoid focal on the same logits)",
)

_DICE_FOCAL = build_compound(
    "dice_focal",
    "Dice + focal (MONAI DiceFocalLoss)",
    [
        (DICE, "lambda_dice", 1.0, "weight of the Dice term"),
        (FOCAL, "lambda_focal", 1.0, "weight of the focal term"),
    ],
    references=("Zhu et al. AnatomyNet. Medical Physics 2019 (Dice + focal)", "MONAI DiceFocalLoss"),
    overrides={"gamma": FOCAL.param("gamma"), "reduction": VOXELWISE_COMPOUND_REDUCTION},
)


def _check_dice_focal(params: Params) -> None:
    assert _DICE_FOCAL.check is not None
    _DICE_FOCAL.check(params)
    if params.reduction == "none":
        softmax_focal = params.activation == "softmax" and not params.sigmoid_focal
        if softmax_focal and not params.channel_mean:
            raise ValueError(
                "loss 'dice_focal': reduction='none' adds the Dice (B, K) values to the focal map (B, K, *spatial), "
                "which a softmax focal term has only with channel_mean=True (or use sigmoid_focal=True, or "
                "activation='sigmoid')"
            )
        if params.batch:
            raise ValueError("loss 'dice_focal': reduction='none' needs batch=False (one Dice value per sample)")


DICE_FOCAL = replace(
    _DICE_FOCAL,
    check=_check_dice_focal,
    params=(*_DICE_FOCAL.params, SIGMOID_FOCAL),
    terms=(_DICE_FOCAL.terms[0], replace(_DICE_FOCAL.terms[1], switches={"sigmoid_focal": {"activation": "sigmoid"}})),
    formula=_DICE_FOCAL.formula + "; sigmoid_focal=True: the focal term uses activation='sigmoid'",
    presets=(
        Preset(
            "monai",
            {"activation": "softmax", "sigmoid_focal": True, "sum_of_means": True},
            "MONAI DiceFocalLoss(softmax=True, to_onehot_y=True) defaults: softmax Dice (smoothing 1e-5) + the "
            "sigmoid focal term (γ = 2) MONAI applies to the same logits",
            "Project-MONAI/MONAI monai/losses/dice.py, DiceFocalLoss (FocalLoss built without use_softmax), v1.5.0",
        ),
        Preset(
            "monai_sigmoid",
            {"activation": "sigmoid", "sum_of_means": True},
            "MONAI DiceFocalLoss(sigmoid=True) defaults (γ = 2, smoothing 1e-5)",
            "Project-MONAI/MONAI monai/losses/dice.py, DiceFocalLoss, v1.5.0",
        ),
    ),
)

DICE_TOPK = build_compound(
    "dice_topk",
    "Dice + top-k cross-entropy (nnU-Net DC_and_topk_loss)",
    [
        (DICE, "lambda_dice", 1.0, "weight of the Dice term"),
        (TOPK_CE, "lambda_ce", 1.0, "weight of the top-k cross-entropy term"),
    ],
    presets=(
        Preset(
            "nnunet",
            merge_presets(DICE.preset("nnunet").values, TOPK_CE.preset("nnunet").values),
            "nnU-Net DC_and_topk_loss as nnUNetTrainerDiceTopK10Loss builds it: TopK(10 %) + (−Dice), smooth 1e-5, "
            "no background",
            "MIC-DKFZ/nnUNet nnunetv2/training/loss/compound_losses.py, variants/loss/nnUNetTrainerTopkLoss.py, v2.8.1",
        ),
    ),
    references=("Ma et al. Loss odyssey in medical image segmentation. MedIA 2021",),
    overrides={"activation": replace(common.ACTIVATION, choices=("softmax", "none"))},
)

GENERALIZED_DICE_BOUNDARY = build_compound(
    "generalized_dice_boundary",
    "Generalised Dice + boundary loss (Kervadec et al.): raise lambda_boundary over training (schedules)",
    [
        (GENERALIZED_DICE, "lambda_region", 1.0, "weight of the generalised Dice term"),
        (BOUNDARY, "lambda_boundary", 0.01, "weight of the boundary term (Kervadec: 0.01, rising per epoch)"),
    ],
    presets=(
        Preset(
            "kervadec2019",
            {"lambda_region": 1.0, "lambda_boundary": 0.01, "include_background": False},
            "GDL (MONAI weights 1/G², foreground classes) + α·BL (foreground classes) with α = 0.01 at epoch 0; "
            "raise α with segloss_core.schedules.RebalanceSchedule. The authors' isles.make/wmh.make recipe keeps "
            "the background in its GeneralizedDice (idc=[0, 1]): segloss_core.compound([('generalized_dice', 1, "
            "{'include_background': True, 'smooth_nr': 1e-10, 'smooth_dr': 1e-10}), ('boundary', 0.01, {})]) "
            "reproduces it (their 1/(G + 1e-10)² weights give an absent class a weight of 1e20; MONAI's do not)",
            "LIVIAETS/boundary-loss losses.py, isles.make, scheduler.py (171c32d)",
        ),
    ),
    references=("Kervadec et al. Boundary loss for highly unbalanced segmentation. MIDL 2019",),
)

SPECS = (DICE_CE, DICE_FOCAL, DICE_TOPK, GENERALIZED_DICE_BOUNDARY)
