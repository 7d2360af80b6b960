"""Parameters shared by several losses: one name, one meaning, everywhere (public: loss plugins use them).

A loss that has one of these parameters takes the object itself (or a ``dataclasses.replace``
of it with another default, as ``boundary`` does for ``include_background``), so the name, the
kind, the range and the one-line meaning stay the same in every loss and every backend:

>>> from segloss_core.losses import common
>>> common.IGNORE_INDEX.name, common.IGNORE_INDEX.default
('ignore_index', None)
"""

from __future__ import annotations

from ..spec import Param, Params

__all__ = [
    "ACTIVATION",
    "BATCH",
    "CLASSES",
    "CLASS_WEIGHTS",
    "IGNORE_INDEX",
    "INCLUDE_BACKGROUND",
    "REDUCTION",
    "REGIONS",
    "check_class_selection",
]

ACTIVATION = Param(
    "activation",
    "choice",
    "softmax",
    "softmax: mutually exclusive classes; sigmoid: independent channels (C = 1 is binary "
    "foreground); none: pred already holds probabilities",
    choices=("softmax", "sigmoid", "none"),
)

IGNORE_INDEX = Param(
    "ignore_index",
    "int",
    None,
    "voxels with this label contribute nothing to any statistic or gradient (may lie outside [0, C))",
    optional=True,
    examples=(255,),
)

REDUCTION = Param(
    "reduction",
    "choice",
    "mean",
    "mean or sum over the loss elements, or none to return them",
    choices=("mean", "sum", "none"),
)

CLASS_WEIGHTS = Param(
    "class_weights",
    "float_seq",
    None,
    "one non-negative weight per channel (C entries, background included)",
    optional=True,
    low=0.0,
)

BATCH = Param(
    "batch",
    "bool",
    False,
    "sum the statistics over the batch too ('batch dice'): one score per class instead of per (sample, class)",
)

INCLUDE_BACKGROUND = Param(
    "include_background",
    "bool",
    True,
    "include channel 0 (no effect with a single sigmoid channel, which is foreground)",
)

CLASSES = Param(
    "classes",
    "int_seq",
    None,
    "explicit channels to include, e.g. (1, 3): overrides include_background's default or preset value "
    "(giving both is an error)",
    optional=True,
    low=0,
    examples=((1,),),
)

REGIONS = Param(
    "regions",
    "regions",
    None,
    "region-based training (nnU-Net): channel r's target is 'label in regions[r]', e.g. BraTS ((1, 2, 3), (2, 3), "
    "(3,)); integer label maps in [0, largest region label], activation sigmoid; every channel is a region, so "
    "include_background has no effect (select channels with classes=); see segloss_core.regions",
    optional=True,
)


def check_class_selection(params: Params) -> None:
    """``classes`` lists exactly the channels to include, so an ``include_background`` the caller gave
    with it is a mistake (ignored, or contradicting it): raise ``ValueError`` naming both.

    The one check of that combination; every loss with both parameters calls it (dice and the region
    family, focal, lovasz_softmax, boundary, hausdorff_dt, and the compounds through their components).
    Only an explicit ``include_background`` (:attr:`~segloss_core.spec.Params.explicit`: given to
    ``get_loss``, ``compound`` or a compound that routes it) conflicts; its default (True for dice,
    False for boundary and hausdorff_dt) and a preset's value (nnU-Net's ``include_background=False``)
    give way to ``classes=``, which overrides ``include_background`` wherever both are set.

    >>> from segloss_core.spec import Params
    >>> values = {"classes": (1,), "include_background": False}
    >>> check_class_selection(Params(values, "boundary", None))  # the default
    >>> check_class_selection(Params(values, "dice", "nnunet"))  # the preset's value
    >>> check_class_selection(Params(values, "dice", None, explicit=["include_background"]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: loss 'dice': give either classes= or include_background=, not both (classes=(1,) ...
    """
    if params.get("classes") is not None and "include_background" in params.explicit:
        raise ValueError(
            f"loss {params.loss!r}: give either classes= or include_background=, not both (classes="
            f"{params.classes!r} lists exactly the channels to include; it overrides "
            f"include_background={params.include_background!r})"
        )
