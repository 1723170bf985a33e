"""The feed-forward's elementwise part: act(g) * u for gated variants, act(g) otherwise.

Activations: ``gelu_tanh`` (HF ``gelu_new``, used by T5 v1.1 gated-gelu), ``gelu`` (exact), ``silu``, ``relu``.

``gated_act_triton`` fuses the activation and the product into one elementwise Triton kernel forward and one
backward (dgate and dup together), registered as ``fat5::gated_act_fwd/_bwd`` through ``torch.library`` so it
works inside ``torch.compile`` graphs. Math is in fp32 with one rounding per output, so in bf16/fp16 it is at
least as accurate as the reference (which rounds after the activation and again after the product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import Launcher, cdiv, next_pow2
from .registration import op_pair

ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "relu")


def activation_ref(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if act == "gelu":
        return F.gelu(x)
    if act == "silu":
        return F.silu(x)
    if act == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {act!r}; valid choices: {', '.join(ACTIVATIONS)}")


def gated_act_ref(gate: torch.Tensor, up: torch.Tensor | None, act: str) -> torch.Tensor:
    a = activation_ref(gate, act)
    return a if up is None else a * up


# --------------------------------------------------------------------------------------------------------------
# Triton kernels: one fused elementwise pass forward (act(g) * u) and one backward (dgate, dup), fp32 math,
# one rounding to the output dtype (the reference rounds twice in low precision: after act and after the
# product). gelu_tanh uses 0.5 * (1 + tanh(y)) == sigmoid(2y), which needs no tanh and is stable at +-inf.
# Tiles are (rows, columns) with the inputs' row stride, which the packed op below uses for the two halves of one
# projection. Limits: the separate-tensor op copies non-contiguous gate/up first.
# --------------------------------------------------------------------------------------------------------------

# globals read inside @triton.jit must be constexpr (the CPU interpreter accepts plain floats, the compiler not)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_C = tl.constexpr(0.044715)
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_BLOCK = 2048


@triton.jit
def _act_fwd(g, ACT: tl.constexpr):
    if ACT == "gelu_tanh":
        out = g * tl.sigmoid(2.0 * _SQRT_2_OVER_PI * (g + _GELU_C * g * g * g))
    elif ACT == "gelu":
        out = 0.5 * g * (1.0 + tl.erf(g * _INV_SQRT2))
    elif ACT == "silu":
        out = g * tl.sigmoid(g)
    else:
        out = tl.maximum(g, 0.0)
    return out


@triton.jit
def _act_fwd_and_grad(g, ACT: tl.constexpr):
    """Returns (act(g), act'(g))."""
    if ACT == "gelu_tanh":
        s = tl.sigmoid(2.0 * _SQRT_2_OVER_PI * (g + _GELU_C * g * g * g))
        a = g * s
        # d/dg [g * sigmoid(2y)] = s + g * 2 s (1 - s) * y',  y' = k (1 + 3 c g^2)
        da = s + 2.0 * g * s * (1.0 - s) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * g * g)
    elif ACT == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(g * _INV_SQRT2))
        a = g * cdf
        da = cdf + g * _INV_SQRT_2PI * tl.exp(-0.5 * g * g)
    elif ACT == "silu":
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    else:
        a = tl.maximum(g, 0.0)
        da = tl.where(g > 0.0, 1.0, 0.0)
    return a, da


@triton.jit
def _gated_act_fwd_kernel(
    G, U, O, M, F, stride_in, up_off, ACT: tl.constexpr, HAS_UP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):  # fmt: skip
    """(M, F) tiles; gate and up rows ``stride_in`` apart and up ``up_off`` elements past U (F and 0 for
    separate tensors; 2F and F for one packed projection whose second half is up), output contiguous."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < F)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    offs_in = r64 * stride_in + cols[None, :]
    g = tl.load(G + offs_in, mask=mask, other=0.0).to(tl.float32)
    out = _act_fwd(g, ACT)
    if HAS_UP:
        out = out * tl.load(U + up_off + offs_in, mask=mask, other=0.0).to(tl.float32)
    tl.store(O + r64 * F + cols[None, :], out.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _gated_act_bwd_kernel(
    DO, G, U, DG, DU, M, F, stride_in, up_off, ACT: tl.constexpr, HAS_UP: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dgate / dup written with the inputs' row stride (into one packed gradient when the inputs are packed)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < F)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    offs_in = r64 * stride_in + cols[None, :]
    do = tl.load(DO + r64 * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs_in, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_fwd_and_grad(g, ACT)
    if HAS_UP:
        u = tl.load(U + up_off + offs_in, mask=mask, other=0.0).to(tl.float32)
        tl.store(DU + up_off + offs_in, (do * a).to(DU.dtype.element_ty), mask=mask)
        do = do * u
    tl.store(DG + offs_in, (do * da).to(DG.dtype.element_ty), mask=mask)


def _grid(m: int, f: int) -> tuple[tuple[int, int], int, int]:
    """About _BLOCK elements a tile: up to 1024 columns, as many rows as fill the rest."""
    block_c = min(1024, next_pow2(max(f, 1)))
    block_r = max(1, _BLOCK // block_c)
    return (cdiv(m, block_r), cdiv(f, block_c)), block_r, block_c


_LAUNCHERS = {k: Launcher(k) for k in (_gated_act_fwd_kernel, _gated_act_bwd_kernel)}


def _launch(kernel, m, f, *args, act, has_up):
    if m and f:
        grid, block_r, block_c = _grid(m, f)
        _LAUNCHERS[kernel][grid](*args, ACT=act, HAS_UP=has_up, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8)


def _check(gate: torch.Tensor, up: torch.Tensor | None, act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; valid choices: {', '.join(ACTIVATIONS)}")
    if up is not None and (up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device):
        raise ValueError(
            f"gated_act: up must match gate in shape, dtype and device, got {tuple(up.shape)} {up.dtype} "
            f"{up.device} vs {tuple(gate.shape)} {gate.dtype} {gate.device}"
        )


def _gated_act_fwd_impl(gate: torch.Tensor, up: torch.Tensor | None, act: str) -> torch.Tensor:
    gate = gate.contiguous()
    up = up.contiguous() if up is not None else None
    out = torch.empty_like(gate)
    f = gate.shape[-1] if gate.dim() else 1
    m = gate.numel() // max(f, 1)
    _launch(
        _gated_act_fwd_kernel,
        m,
        f,
        gate,
        up if up is not None else gate,
        out,
        m,
        f,
        f,
        0,
        act=act,
        has_up=up is not None,
    )
    return out


def _gated_act_fwd_fake(gate, up, act):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _gated_act_bwd_impl(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None, act: str
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_out, gate = grad_out.contiguous(), gate.contiguous()
    up = up.contiguous() if up is not None else None
    dgate = torch.empty_like(gate)
    # without up there is no dup: an empty tensor keeps the op's output list fixed
    dup = torch.empty_like(up) if up is not None else gate.new_empty(0)
    f = gate.shape[-1] if gate.dim() else 1
    m = gate.numel() // max(f, 1)
    g_up = up if up is not None else gate
    d_up = dup if up is not None else dgate
    _launch(
        _gated_act_bwd_kernel,
        m,
        f,
        grad_out,
        gate,
        g_up,
        dgate,
        d_up,
        m,
        f,
        f,
        0,
        act=act,
        has_up=up is not None,
    )
    return dgate, dup


def _gated_act_bwd_fake(grad_out, gate, up, act):
    dgate = torch.empty_like(gate, memory_format=torch.contiguous_format)
    dup = torch.empty_like(up, memory_format=torch.contiguous_format) if up is not None else gate.new_empty(0)
    return dgate, dup


def _gated_act_setup(ctx, inputs, output):
    gate, up, act = inputs
    ctx.act = act
    ctx.has_up = up is not None
    ctx.save_for_backward(gate, up)


def _gated_act_backward(ctx, grad_out, bwd):
    gate, up = ctx.saved_tensors
    dgate, dup = bwd(grad_out, gate, up, ctx.act)
    return dgate.view_as(gate), (dup.view_as(up) if ctx.has_up else None), None


_gated_act, _gated_act_fwd, _gated_act_bwd = op_pair(
    "gated_act",
    _gated_act_fwd_impl,
    _gated_act_fwd_fake,
    _gated_act_bwd_impl,
    _gated_act_bwd_fake,
    _gated_act_setup,
    _gated_act_backward,
)


def gated_act_triton(gate: torch.Tensor, up: torch.Tensor | None, act: str) -> torch.Tensor:
    """act(gate) * up (or act(gate) when up is None) with fused Triton forward and backward kernels."""
    _check(gate, up, act)
    return _gated_act(gate, up, act)


# --------------------------------------------------------------------------------------------------------------
# Packed: gate and up as the two halves of one projection's output gu = x @ [W_gate; W_up]^T (..., 2F), so the
# feed-forward runs one input GEMM instead of two, and its input gradient is one GEMM over K = 2F accumulated in
# fp32 (two GEMMs would round each half's gradient to bf16 before they are summed). The backward writes dgate
# and dup into one (..., 2F) gradient, the layout that GEMM's backward wants, with no concatenation.
# --------------------------------------------------------------------------------------------------------------


def _split_packed(gu: torch.Tensor) -> int:
    if gu.dim() == 0 or gu.shape[-1] % 2:
        raise ValueError(
            f"gated_act_packed: the last dim holds gate then up and must be even, got shape {tuple(gu.shape)}"
        )
    return gu.shape[-1] // 2


def _packed_fwd_impl(gu: torch.Tensor, act: str) -> torch.Tensor:
    gu = gu.contiguous()
    f = gu.shape[-1] // 2
    m = gu.numel() // max(2 * f, 1)
    out = gu.new_empty(gu.shape[:-1] + (f,))
    _launch(_gated_act_fwd_kernel, m, f, gu, gu, out, m, f, 2 * f, f, act=act, has_up=True)
    return out


def _packed_fwd_fake(gu, act):
    return gu.new_empty(gu.shape[:-1] + (gu.shape[-1] // 2,))


def _packed_bwd_impl(grad_out: torch.Tensor, gu: torch.Tensor, act: str) -> torch.Tensor:
    grad_out, gu = grad_out.contiguous(), gu.contiguous()
    f = gu.shape[-1] // 2
    m = gu.numel() // max(2 * f, 1)
    dgu = torch.empty_like(gu)
    _launch(_gated_act_bwd_kernel, m, f, grad_out, gu, gu, dgu, dgu, m, f, 2 * f, f, act=act, has_up=True)
    return dgu


def _packed_bwd_fake(grad_out, gu, act):
    return torch.empty_like(gu, memory_format=torch.contiguous_format)


def _packed_setup(ctx, inputs, output):
    gu, act = inputs
    ctx.act = act
    ctx.save_for_backward(gu)


def _packed_backward(ctx, grad_out, bwd):
    (gu,) = ctx.saved_tensors
    return bwd(grad_out, gu, ctx.act).view_as(gu), None


_gated_act_packed, _gated_act_packed_fwd, _gated_act_packed_bwd = op_pair(
    "gated_act_packed",
    _packed_fwd_impl,
    _packed_fwd_fake,
    _packed_bwd_impl,
    _packed_bwd_fake,
    _packed_setup,
    _packed_backward,
)


def gated_act_packed_ref(gu: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up where gu = cat([gate, up], -1)."""
    f = _split_packed(gu)
    return gated_act_ref(gu[..., :f], gu[..., f:], act)


def gated_act_packed_triton(gu: torch.Tensor, act: str) -> torch.Tensor:
    """gated_act_packed_ref with the fused Triton kernels: one read of gu, dgu written as one tensor."""
    _split_packed(gu)
    _check(gu, None, act)
    return _gated_act_packed(gu, act)
