"""Per-voxel terms for element maps (``reduction="none"`` of cross-entropy, BCE, focal) on torch.

The statistics path sums each term of ``segloss_core.statistics.TABLE`` over the voxels (natively
or in the fused kernels); an element map needs the terms themselves, so it is computed here,
densely with torch ops under autograd, whatever ``impl`` the loss uses: w·term (B, C, N) with an
exact 0 where w == 0, in the accumulation dtype (float32 for float16/bfloat16).
"""

from __future__ import annotations

from collections.abc import Iterable

import array_api_compat.torch as xp_torch
import torch
import torch.nn.functional as F

from segloss_core import statistics as stat_names
from segloss_core.validation import PreparedInputs

from .native import accumulation_dtype, target_and_weights


def compute_elements(prepared: PreparedInputs, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The per-voxel terms w·f of the statistics ``names``, each (B, C, N), differentiable."""
    batch, channels = prepared.batch_size, prepared.num_classes
    dtype = accumulation_dtype(prepared.pred.dtype)
    z = prepared.pred.reshape(batch, channels, -1).to(dtype)
    g, w = target_and_weights(prepared, dtype)
    log_1mp = None
    if prepared.activation == "softmax":
        log_p = torch.log_softmax(z, dim=1)
        p = log_p.exp()
    elif prepared.activation == "sigmoid":
        log_p, log_1mp = F.logsigmoid(z), F.logsigmoid(-z)
        p = log_p.exp()
    else:
        p, log_p, log_1mp = z, torch.log(z), torch.log1p(-z)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        base, arg = stat_names.parse(name)
        entry = stat_names.TABLE[base]
        if entry.sigmoid_only and prepared.activation == "softmax":
            raise ValueError(f"statistic {name!r} needs activation 'sigmoid' or 'none'")
        if "field" in entry.reads:
            raise ValueError(f"statistic {name!r} has no element map (it reads a field)")
        v = stat_names.Voxel(p=p, g=g, log_p=log_p, log_1mp=log_1mp, arg=arg)
        out[name] = stat_names.weighted_elements(xp_torch, entry.term(xp_torch, v), w, channels)
    return out
