"""AdamWScale's update of one tensor as one Triton kernel: a single read of p, g, m, v (and the Kahan buffer)
and a single write of p, m, v, in fp32 math, with the skip decision read on the device.

The foreach implementation in ``optim.py`` is the specification; this kernel computes the same formulas
(see its docstring) with one rounding per stored value instead of one per foreach op, and it needs no host
value: the step count, the parameter's norm and the skip flag are device tensors. A set skip flag leaves
every value unchanged, the step count included (the caller increments the count by ``1 - skip`` first),
so a non-finite step can be dropped without the host reading anything.

Limits: dense tensors; the parameter, its gradient and its states contiguous and of one shape (they are
viewed flat; FSDP shards are passed as their local tensors).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_BLOCK = 4096


@triton.jit
def _adamw_scale_kernel(
    P, G, M, V, C, STEP, NORM, SKIP, n, inv_sqrt_numel, lr, beta1, beta2, log2_beta1, log2_beta2, eps, wd,
    scale_floor, KAHAN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    if tl.load(SKIP) == 0:
        t = tl.load(STEP).to(tl.float32)  # already counts this step
        bias1 = 1.0 - tl.exp2(t * log2_beta1)
        inv_sqrt_bias2 = 1.0 / tl.sqrt(1.0 - tl.exp2(t * log2_beta2))
        scale = tl.maximum(tl.load(NORM).to(tl.float32) * inv_sqrt_numel, scale_floor)
        step_size = -lr * scale / bias1
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
        p_in = tl.load(P + offs, mask=mask, other=0.0)
        p = p_in.to(tl.float32)
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        u = step_size * m / (tl.sqrt(v) * inv_sqrt_bias2 + eps) - (lr * wd) * p
        tl.store(M + offs, m.to(M.dtype.element_ty), mask=mask)
        tl.store(V + offs, v.to(V.dtype.element_ty), mask=mask)
        if KAHAN:
            # comp holds what earlier roundings dropped: p_new = round(p + comp + u), comp = comp + u - applied
            c = tl.load(C + offs, mask=mask, other=0.0).to(tl.float32) + u
            p_new = (p + c).to(P.dtype.element_ty)
            tl.store(P + offs, p_new, mask=mask)
            tl.store(C + offs, (c - (p_new.to(tl.float32) - p)).to(C.dtype.element_ty), mask=mask)
        else:
            tl.store(P + offs, (p + u).to(P.dtype.element_ty), mask=mask)


def adamw_scale_update_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    comps: list[torch.Tensor] | None,
    steps: list[torch.Tensor],
    norms: list[torch.Tensor],
    numels: list[int],
    skip: torch.Tensor,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scale_floor: float,
) -> None:
    """In-place AdamWScale update of each tensor; ``steps`` (device, already incremented unless skipped),
    ``norms`` (the L2 norm of each parameter before the step, 0-dim fp32) and ``skip`` (0-dim; nonzero =
    leave everything as it is) live on the parameters' device. ``numels``: global sizes, for the RMS."""
    beta1, beta2 = betas
    # log2(0) is -inf: beta = 0 means no bias correction is needed (1 - 0^t = 1); exp2(t * -inf) = 0 for t > 0
    log2_b1 = math.log2(beta1) if beta1 > 0 else -math.inf
    log2_b2 = math.log2(beta2) if beta2 > 0 else -math.inf
    for i, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        for name, t in (("grad", grads[i]), ("exp_avg", exp_avgs[i]), ("exp_avg_sq", exp_avg_sqs[i])):
            if t.shape != p.shape or not t.is_contiguous():
                raise ValueError(
                    f"adamw_scale_update_: {name} must be contiguous and shaped like its parameter"
                )
        if not p.is_contiguous():
            raise ValueError("adamw_scale_update_: parameters must be contiguous")
        c = comps[i] if comps is not None else p
        _adamw_scale_kernel[(triton.cdiv(n, _BLOCK),)](
            p, grads[i], exp_avgs[i], exp_avg_sqs[i], c, steps[i], norms[i], skip, n,
            1.0 / math.sqrt(numels[i]), lr, beta1, beta2, log2_b1, log2_b2, eps, weight_decay, scale_floor,
            KAHAN=comps is not None, BLOCK=_BLOCK, num_warps=8,
        )  # fmt: skip
