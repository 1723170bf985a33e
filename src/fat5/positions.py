"""Positional encodings: T5 relative buckets, RoPE, ALiBi and FIRE.

Convention everywhere: a query at absolute position ``q_offset + i`` and a key at position ``j``; the
relative position is ``j - (q_offset + i)`` (key minus query, as HF T5). A decoder step against a KV cache is
the same computation with ``q_offset`` = number of cached tokens, so every encoding is offset-correct.

- T5 (Raffel et al. 2020): log-spaced buckets of the relative position, one learned scalar per (bucket, head).
- RoPE (Su et al. 2021): rotate query and key channels by position; never values, never cross-attention.
- ALiBi (Press et al. 2022): bias = -slope_h * |relative position|; slopes as in the paper.
- FIRE (Li et al. 2023): bias = MLP(psi(|rel|) / psi(max(threshold, query position))), psi(x) = log(c x + 1),
  with learned c and threshold; valid for any query/key lengths.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """HF T5's bucketing, bit-for-bit (same float ops), for any integer tensor of key-minus-query distances."""
    # the log-spaced buckets span distances max_exact..max_distance: a max_distance at or below max_exact
    # divides by log(<= 1) and gives garbage bucket ids (HF T5 does the same silently)
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if max_exact < 1 or max_distance <= max_exact:
        raise ValueError(
            f"T5 relative buckets: max_distance ({max_distance}) must exceed the exact range "
            f"({max_exact} = num_buckets {num_buckets} // {4 if bidirectional else 2}) and num_buckets must be "
            f">= {4 if bidirectional else 2}; raise relative_attention_max_distance or lower the bucket count"
        )
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(relative_position.dtype) * num_buckets
        relative_position = relative_position.abs()
    else:
        relative_position = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(relative_position.dtype)
    if_large = torch.clamp(if_large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative_position, if_large)


def relative_positions(m: int, n: int, q_offset: int | torch.Tensor = 0, device=None) -> torch.Tensor:
    """(m, n) tensor of key-minus-query distances for queries at q_offset..q_offset+m-1."""
    q = torch.arange(m, device=device) + q_offset
    k = torch.arange(n, device=device)
    return k[None, :] - q[:, None]


def t5_bias(
    table: torch.Tensor, m: int, n: int, bidirectional: bool, max_distance: int, q_offset: int = 0
) -> torch.Tensor:
    """Materialize the (1, H, m, n) T5 bias from a (num_buckets, H) table (reference path only)."""
    rel = relative_positions(m, n, q_offset, table.device)
    buckets = relative_position_bucket(rel, bidirectional, table.shape[0], max_distance)
    return table[buckets].permute(2, 0, 1).unsqueeze(0)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Slopes of Press et al.: geometric sequence from 2^(-8/n); non-powers of two interleave the next power."""

    def pow2(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = pow2(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = pow2(closest) + pow2(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, m: int, n: int, q_offset: int = 0) -> torch.Tensor:
    rel = relative_positions(m, n, q_offset, slopes.device).abs().to(slopes.dtype)
    return (-slopes[:, None, None] * rel).unsqueeze(0)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE on (B, H, L, D) tensors at absolute positions."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got d_kv={dim}")
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # positions: (L,) or (B, L) -> angles (.., L, D/2)
        angles = positions.float()[..., None] * self.inv_freq
        if angles.dim() == 3:  # (B, L, D/2) -> (B, 1, L, D/2)
            angles = angles[:, None]
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x.float().chunk(2, dim=-1)
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (x.float() * cos + rotated * sin).to(x.dtype)


class FIRE(nn.Module):
    """Functional Interpolation for Relative positions: a learned bias valid at any length."""

    def __init__(self, num_heads: int, hidden: int = 32, init_threshold: float = 512.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, num_heads))
        self.log_c = nn.Parameter(torch.zeros(()))  # c = exp(log_c) > 0, starts at 1
        self.threshold = nn.Parameter(torch.tensor(float(init_threshold)))

    def forward(self, m: int, n: int, q_offset: int = 0, bidirectional: bool = True) -> torch.Tensor:
        device = self.threshold.device
        q = (torch.arange(m, device=device) + q_offset).float()
        k = torch.arange(n, device=device).float()
        dist = (q[:, None] - k[None, :]).abs()
        c = self.log_c.exp()
        # normaliser: the query position (causal) or the farther of the two (bidirectional), at least the
        # learned threshold, +1 so position 0 is well defined.
        span = torch.maximum(q[:, None], k[None, :]) if bidirectional else q[:, None].expand(m, n)
        norm = torch.log(c * torch.maximum(span + 1, self.threshold.abs()) + 1)
        x = torch.log(c * dist + 1) / norm
        bias = self.mlp(x[..., None].to(self.mlp[0].weight.dtype))  # (m, n, H)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, H, m, n)
