"""AdamWScale's update as one Triton kernel launch for all tensors of one dtype (a table of their addresses,
as a multi-tensor apply): a single read of p, g, m, v (and the Kahan buffer) and a single write of p, m, v
per element, in fp32 math, with the skip decision read on the device.

The foreach implementation in ``optim.py`` is the specification; this kernel computes the same formulas
(see its docstring) with one rounding per stored value instead of one per foreach op (and eps added in fp32,
where the foreach path raises it to fp16's smallest subnormal for fp16 tensors), and it needs no host
value: the step count, the parameter's norm and the skip flag are device tensors. A set skip flag leaves
every value unchanged, the step count included (a first, tiny launch adds 1 to each count unless the flag is
set), so a non-finite step can be dropped without the host reading anything.

Limits: dense tensors; the parameter, its gradient and its states contiguous and of one shape (they are
viewed flat; FSDP shards are passed as their local tensors); each tensor under 2^31 blocks of 4096.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import Launcher, cdiv

_BLOCK = 4096
_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _adamw_scale_kernel(
    PTRS, PROG_T, PROG_B, NUMEL, INV_SQRT_NUMEL, NORMS, SKIP, T, lr, beta1, beta2, log2_beta1, log2_beta2,
    eps, wd, scale_floor, DT: tl.constexpr, GDT: tl.constexpr, KAHAN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """All tensors of one dtype in one launch: program i updates block PROG_B[i] of tensor PROG_T[i]; PTRS
    holds, per tensor, the addresses of p, g, m, v, the Kahan buffer and the step count (rows of T)."""
    if tl.load(SKIP) == 0:
        pid = tl.program_id(0)
        t = tl.load(PROG_T + pid)
        blk = tl.load(PROG_B + pid).to(tl.int64)
        P = tl.load(PTRS + t).to(tl.pointer_type(DT))
        G = tl.load(PTRS + T + t).to(tl.pointer_type(GDT))
        M = tl.load(PTRS + 2 * T + t).to(tl.pointer_type(DT))
        V = tl.load(PTRS + 3 * T + t).to(tl.pointer_type(DT))
        STEP = tl.load(PTRS + 5 * T + t).to(tl.pointer_type(tl.float32))
        n = tl.load(NUMEL + t)
        step = tl.load(STEP)  # already counts this step
        bias1 = 1.0 - tl.exp2(step * log2_beta1)
        inv_sqrt_bias2 = 1.0 / tl.sqrt(1.0 - tl.exp2(step * log2_beta2))
        scale = tl.maximum(tl.load(NORMS + t) * tl.load(INV_SQRT_NUMEL + t), scale_floor)
        step_size = -lr * scale / bias1
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        u = step_size * m / (tl.sqrt(v) * inv_sqrt_bias2 + eps) - (lr * wd) * p
        tl.store(M + offs, m.to(DT), mask=mask)
        tl.store(V + offs, v.to(DT), mask=mask)
        if KAHAN:
            # comp holds what earlier roundings dropped: p_new = round(p + comp + u), comp = comp + u - applied
            C = tl.load(PTRS + 4 * T + t).to(tl.pointer_type(DT))
            c = tl.load(C + offs, mask=mask, other=0.0).to(tl.float32) + u
            p_new = (p + c).to(DT)
            tl.store(P + offs, p_new, mask=mask)
            tl.store(C + offs, (c - (p_new.to(tl.float32) - p)).to(DT), mask=mask)
        else:
            tl.store(P + offs, (p + u).to(DT), mask=mask)


@triton.jit
def _count_step_kernel(PTRS, SKIP, T):
    """Program t adds 1 to tensor t's step count (row 5 of the address table) unless the step is skipped: a
    launch of its own, so every program of the update kernel then reads the same, new count."""
    if tl.load(SKIP) == 0:
        STEP = tl.load(PTRS + 5 * T + tl.program_id(0)).to(tl.pointer_type(tl.float32))
        tl.store(STEP, tl.load(STEP) + 1.0)


_ADAMW_SCALE, _COUNT_STEP = Launcher(_adamw_scale_kernel), Launcher(_count_step_kernel)


_TABLES: dict = {}  # (device, numels) -> (PROG_T, PROG_B, NUMEL, INV_SQRT_NUMEL): fixed for a parameter set
# (device, dtype, grad dtype, local and global numels) -> (the host list of addresses, their device copy) of the
# last launch: where no address changed (the states never move; gradients often come back at the same
# addresses), the device copy is reused and nothing is copied. It is only read by the kernels, so reusing it while an earlier launch runs is safe.
_PTRS: dict = {}


def _tables(device: torch.device, local_numels: tuple[int, ...], numels: tuple[int, ...]):
    key = (device, local_numels, numels)
    if key not in _TABLES:
        blocks = torch.tensor([cdiv(n, _BLOCK) for n in local_numels])
        prog_t = torch.repeat_interleave(torch.arange(len(local_numels)), blocks)
        starts = torch.cumsum(blocks, 0) - blocks
        prog_b = torch.arange(len(prog_t)) - torch.repeat_interleave(starts, blocks)
        _TABLES[key] = (
            prog_t.to(device=device, dtype=torch.int32),
            prog_b.to(device=device, dtype=torch.int32),
            torch.tensor(local_numels, dtype=torch.int64, device=device),
            torch.tensor(
                [1.0 / math.sqrt(n) if n else 0.0 for n in numels], dtype=torch.float32, device=device
            ),
        )
    return _TABLES[key]


def _check(params, grads, exp_avgs, exp_avg_sqs, steps, dt, gdt) -> None:
    for i, p in enumerate(params):
        for name, t in (("grad", grads[i]), ("exp_avg", exp_avgs[i]), ("exp_avg_sq", exp_avg_sqs[i])):
            if t.shape != p.shape or not t.is_contiguous():
                raise ValueError(
                    f"adamw_scale_update_: {name} must be contiguous and shaped like its parameter"
                )
        if not p.is_contiguous() or p.dtype != dt or grads[i].dtype != gdt or exp_avgs[i].dtype != dt:
            raise ValueError(
                "adamw_scale_update_: contiguous parameters of one dtype, gradients of one dtype"
            )
        if steps[i].dtype != torch.float32:
            raise ValueError("adamw_scale_update_: step counts must be fp32 tensors")


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
    """In-place AdamWScale update of all tensors (one dtype, one device) in one launch, after one that counts
    the step. ``steps`` (fp32 device 0-dim tensors: incremented here unless skipped), ``norms`` (the L2 norm of
    each parameter before the step, 0-dim fp32) and ``skip`` (0-dim int32; nonzero = leave everything as it
    is) live on the parameters' device. ``numels``: global sizes, for the RMS (they differ from the local ones
    for shards). Nothing here waits for the device."""
    # an empty tensor (an FSDP shard may be one) gets no update program; its step is counted like the others
    local_numels = tuple(p.numel() for p in params)
    dt, gdt = params[0].dtype, grads[0].dtype
    device = params[0].device
    cols = (params, grads, exp_avgs, exp_avg_sqs, comps if comps is not None else params, steps)
    addrs = [t.data_ptr() for col in cols for t in col]
    key = (device, dt, gdt, local_numels, tuple(numels))
    cached = _PTRS.get(key)
    if cached is None or cached[0] != addrs:
        _check(params, grads, exp_avgs, exp_avg_sqs, steps, dt, gdt)  # new tensors: check them once
        ptrs = torch.tensor(addrs, dtype=torch.int64)
        # pinned, the copy is asynchronous (from pageable memory it would wait for the stream)
        if device.type == "cuda":
            ptrs = ptrs.pin_memory()
        cached = _PTRS[key] = (addrs, ptrs.to(device, non_blocking=True))
    beta1, beta2 = betas
    # log2(0) is -inf: beta = 0 needs no bias correction (1 - 0^t = 1), and exp2(t * -inf) = 0 for t > 0
    log2_b1 = math.log2(beta1) if beta1 > 0 else -math.inf
    log2_b2 = math.log2(beta2) if beta2 > 0 else -math.inf
    prog_t, prog_b, numel_t, inv_sqrt_numel = _tables(device, local_numels, tuple(numels))
    _COUNT_STEP[(len(params),)](cached[1], skip, len(params))
    if prog_t.numel() == 0:  # every tensor empty
        return
    _ADAMW_SCALE[(prog_t.numel(),)](
        cached[1], prog_t, prog_b, numel_t, inv_sqrt_numel, torch.stack(norms).float(), skip, len(params), lr, beta1,
        beta2, log2_b1, log2_b2, eps, weight_decay, scale_floor, DT=_DTYPES[dt], GDT=_DTYPES[gdt],
        KAHAN=comps is not None, BLOCK=_BLOCK, num_warps=8,
    )  # fmt: skip
