"""RMSNorm as in T5 (no mean subtraction, no bias): y = x / sqrt(mean(x^2) + eps) * w, statistics in fp32.

``rms_norm_ref`` is the specification. With ``residual`` given, the op first forms ``x + residual`` and
returns ``(normed, new_residual)``: the pre-norm block's add and norm in one pass.
"""

from __future__ import annotations

import torch


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: last dim of x ({x.shape[-1]}) != weight size ({weight.shape[0]})")
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    y = y.to(x.dtype)
    return (y, x) if residual is not None else y
