"""Scaled dot-product attention with an additive position bias and masks.

This file starts with ``attention_ref``: the plain-PyTorch specification every kernel is tested against.

scores[b, h, i, j] = scale * <q[b,h,i], k[b,h,j]> + bias[b, h, i, j]
with the bias one of: a T5 relative-bucket table (num_buckets, H); ALiBi slopes (H,); an arbitrary tensor
broadcastable to (B, H, M, N); or nothing. A query i sits at absolute position ``q_offset + i`` (default
``N - M``: bottom-right aligned, so a decoder step against N cached keys is the last row of a full pass).
Masks (key j is visible to query i iff all hold): ``key_padding_mask[b, j]`` (True = real token); causal
``j <= q_offset + i``; packed documents ``q_segment_ids[b, i] == kv_segment_ids[b, j]``. A query that sees
no key at all outputs zeros (never NaN).
Layout: q (B, H, M, D), k and v (B, H, N, D); any strides. Packed projections are accepted as they come out
of one GEMM: ``q`` (B, M, 3, H, D) with ``k = v = None`` (self-attention), or ``k`` (B, N, 2, H, D) with
``v = None`` (keys and values); ``unpack_qkv`` gives the (B, H, L, D) views. The Triton kernels then write the
gradient of the packed tensor directly, instead of autograd gathering three strided gradients into it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..positions import alibi_bias, relative_position_bucket


def resolve_q_offset(m: int, n: int, q_offset: int | torch.Tensor | None) -> int | torch.Tensor:
    return n - m if q_offset is None else q_offset


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """(B, L) segment ids from per-row cumulative document lengths (B, S+1); positions past the last
    boundary get id -1 (padding). Runs on the device: no host synchronisation."""
    pos = torch.arange(length, device=cu_seqlens.device)
    seg = torch.searchsorted(
        cu_seqlens[:, 1:].contiguous(), pos.expand(batch, length).contiguous(), right=True
    )
    return torch.where(pos[None, :] < cu_seqlens[:, -1:], seg, torch.full_like(seg, -1))


def build_mask(
    b: int,
    m: int,
    n: int,
    device: torch.device,
    causal: bool,
    q_offset: int | torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    q_segment_ids: torch.Tensor | None,
    kv_segment_ids: torch.Tensor | None,
) -> torch.Tensor | None:
    """(B|1, 1, M, N) boolean visibility mask, or None when every key is visible."""
    mask = None
    if causal:
        qpos = torch.arange(m, device=device) + q_offset
        mask = (torch.arange(n, device=device)[None, :] <= qpos[:, None])[None, None]
    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, n):
            raise ValueError(
                f"key_padding_mask must be (batch, keys) = {(b, n)}, got {tuple(key_padding_mask.shape)}"
            )
        kp = key_padding_mask.bool()[:, None, None, :]
        mask = kp if mask is None else mask & kp
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None:
        if q_segment_ids.shape != (b, m) or kv_segment_ids.shape != (b, n):
            raise ValueError(
                f"segment ids must be (batch, queries) = {(b, m)} and (batch, keys) = {(b, n)}, got "
                f"{tuple(q_segment_ids.shape)} and {tuple(kv_segment_ids.shape)}"
            )
        seg = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
        mask = seg if mask is None else mask & seg
    return mask


def position_bias_ref(
    m: int,
    n: int,
    q_offset: int | torch.Tensor,
    device: torch.device,
    rel_table: torch.Tensor | None = None,
    rel_bidirectional: bool = True,
    rel_max_distance: int = 128,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor | None:
    if rel_table is not None:
        rel = torch.arange(n, device=device)[None, :] - (torch.arange(m, device=device) + q_offset)[:, None]
        buckets = relative_position_bucket(rel, rel_bidirectional, rel_table.shape[0], rel_max_distance)
        return rel_table[buckets].permute(2, 0, 1).unsqueeze(0)  # (1, H, M, N)
    if alibi_slopes is not None:
        return alibi_bias(
            alibi_slopes.to(torch.promote_types(alibi_slopes.dtype, torch.float32)), m, n, q_offset
        )
    return None


def unpack_qkv(
    q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, H, L, D) views of q, k, v given separately or packed (module docstring)."""
    if k is None and v is None:
        if q.dim() != 5 or q.shape[2] != 3:
            raise ValueError(
                f"packed qkv must be (B, M, 3, H, D) when k and v are None, got {tuple(q.shape)}"
            )
        return q[:, :, 0].transpose(1, 2), q[:, :, 1].transpose(1, 2), q[:, :, 2].transpose(1, 2)
    if v is None:
        if k is None or k.dim() != 5 or k.shape[2] != 2:
            shape = None if k is None else tuple(k.shape)
            raise ValueError(f"packed kv must be (B, N, 2, H, D) when v is None, got {shape}")
        return q, k[:, :, 0].transpose(1, 2), k[:, :, 1].transpose(1, 2)
    if k is None:
        raise ValueError("k is None but v is given: pass k, or packed qkv with k = v = None")
    return q, k, v


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float = 1.0,
    causal: bool = False,
    q_offset: int | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    rel_table: torch.Tensor | None = None,
    rel_bidirectional: bool = True,
    rel_max_distance: int = 128,
    alibi_slopes: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    q_segment_ids: torch.Tensor | None = None,
    kv_segment_ids: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    q, k, v = unpack_qkv(q, k, v)
    b, h, m, d = q.shape
    n = k.shape[2]
    if k.shape != (b, h, n, d) or v.shape[:3] != (b, h, n):
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected (B, H, M|N, D)"
        )
    if sum(x is not None for x in (bias, rel_table, alibi_slopes)) > 1:
        raise ValueError("give at most one of bias, rel_table, alibi_slopes")
    off = resolve_q_offset(m, n, q_offset)
    # softmax statistics in fp32 or better (as HF T5 does; float64 inputs stay float64), output in the input dtype
    ct = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    pos = position_bias_ref(m, n, off, q.device, rel_table, rel_bidirectional, rel_max_distance, alibi_slopes)
    if pos is not None:
        scores = scores + pos.to(ct)
    if bias is not None:
        scores = scores + bias.to(ct)
    mask = build_mask(b, m, n, q.device, causal, off, key_padding_mask, q_segment_ids, kv_segment_ids)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:  # rows with no visible key: softmax gave NaN, the spec says zeros
        probs = probs.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v.to(ct)).to(q.dtype)
