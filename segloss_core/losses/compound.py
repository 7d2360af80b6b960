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
            sub = Params({k: v for k, v in resolved.items() if k in own}, spec.name, None)
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
            "nnunet_nosmooth",
            merge_presets(DICE.preset("nnunet_nosmooth").values),
            "nnUNetTrainerDiceCELoss_noSmooth: CE + (−2I/max(P + G, 1e-8))",
            "MIC-DKFZ/nnUNet nnunetv2/training/nnUNetTrainer/variants/loss/nnUNetTrainerDiceLoss.py, v2.8.1",
        ),
    ),
    references=("Isensee et al. nnU-Net. Nature Methods 2021", "MONAI DiceCELoss"),
)

DICE_FOCAL = build_compound(
    "dice_focal",
    "Dice + focal (MONAI DiceFocalLoss with one shared activation)",
    [
        (DICE, "lambda_dice", 1.0, "weight of the Dice term"),
        (FOCAL, "lambda_focal", 1.0, "weight of the focal term"),
    ],
    presets=(
        Preset(
            "monai_sigmoid",
            {"activation": "sigmoid"},
            "MONAI DiceFocalLoss(sigmoid=True) defaults (γ = 2, smoothing 1e-5). MONAI's DiceFocalLoss(softmax=True) "
            "applies a sigmoid focal term to the same logits; reproduce it with segloss_core.compound([('dice', 1, "
            "{'activation': 'softmax'}), ('focal', 1, {'activation': 'sigmoid'})])",
            "Project-MONAI/MONAI monai/losses/dice.py, DiceFocalLoss, v1.5.0",
        ),
    ),
    references=("Zhu et al. AnatomyNet. Medical Physics 2019 (Dice + focal)", "MONAI DiceFocalLoss"),
    overrides={"gamma": FOCAL.param("gamma")},
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
