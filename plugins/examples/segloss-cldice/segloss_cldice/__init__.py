"""segloss-cldice: the clDice loss (Shit et al., CVPR 2021) as a segloss loss plugin.

Installed, it adds the losses ``cldice`` and ``dice_cldice`` to every backend that provides
segloss's operators (numpy, torch, ...):

>>> from segloss_core import list_losses
>>> {"cldice", "dice_cldice"} <= set(list_losses())
True
"""

from __future__ import annotations

from .loss import CLDICE, DICE_CLDICE, cldice_forward
from .skeleton import soft_dilate, soft_erode, soft_open, soft_skeleton

__all__ = ["CLDICE", "DICE_CLDICE", "cldice_forward", "soft_dilate", "soft_erode", "soft_open", "soft_skeleton"]
