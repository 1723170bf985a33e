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
# Limits: inputs are flattened, so non-contiguous gate/up (e.g. chunks of a fused projection) are copied first.
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
def _gated_act_fwd_kernel(G, U, O, n, ACT: tl.constexpr, HAS_UP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    out = _act_fwd(g, ACT)
    if HAS_UP:
        out = out * tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(O + offs, out.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _gated_act_bwd_kernel(DO, G, U, DG, DU, n, ACT: tl.constexpr, HAS_UP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_fwd_and_grad(g, ACT)
    if HAS_UP:
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DU + offs, (do * a).to(DU.dtype.element_ty), mask=mask)
        do = do * u
    tl.store(DG + offs, (do * da).to(DG.dtype.element_ty), mask=mask)


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
    n = gate.numel()
    if n:
        grid = (triton.cdiv(n, _BLOCK),)
        _gated_act_fwd_kernel[grid](
            gate,
            up if up is not None else gate,
            out,
            n,
            ACT=act,
            HAS_UP=up is not None,
            BLOCK=_BLOCK,
            num_warps=8,
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
    n = gate.numel()
    if n:
        grid = (triton.cdiv(n, _BLOCK),)
        _gated_act_bwd_kernel[grid](
            grad_out,
            gate,
            up if up is not None else gate,
            dgate,
            dup if up is not None else dgate,
            n,
            ACT=act,
            HAS_UP=up is not None,
            BLOCK=_BLOCK,
            num_warps=8,
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
