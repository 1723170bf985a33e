"""Optimizers and learning-rate schedules for fat5 training.

``AdamWScale`` is Adam whose step for each tensor is scaled by ``max(1e-3, RMS(param))`` (Adafactor's
"relative step", as in nanoT5's AdamWScale): with the T5 initialisation, tensors of very different scales
then move by the same *relative* amount, which lets T5 train with Adam at LR ~1e-2. Per step, per tensor::

    m = b1 m + (1 - b1) g          v = b2 v + (1 - b2) g^2
    u = -lr * sqrt(1 - b2^t) / (1 - b1^t) * max(1e-3, rms(p)) * m / (sqrt(v) + eps)  - lr * wd * p
    p = p + u

(the RMS is that of the parameter before the step; eps is added to the bias-corrected sqrt(v), torch's
convention; weight decay is decoupled and not RMS-scaled, as in nanoT5). On CPU everything runs as
``torch._foreach_*`` ops over all tensors of one device and dtype (the step count and the LR are host
numbers). On CUDA the update of all tensors of one dtype is one fused Triton launch (``ops/adamw_scale.py``:
one read and one write of each state instead of a dozen foreach passes) with the step counts on the device;
``step(skip_if=t)`` then drops a step (non-finite gradients) on the device too, so the training step never
syncs the GPU.

Precision modes, chosen by the dtype of the parameters handed in:

* fp32 parameters (fp32 master weights; the forward may run under bf16 autocast): fp32 states.
* bf16 parameters with ``kahan=True``: states in bf16 and a bf16 *Kahan compensation* buffer per tensor that
  keeps the part of each update that rounding to bf16 dropped and adds it back on later steps
  (Kahan summation, as in "Revisiting BFloat16 Training", Zamirai et al. 2020, and optimi). Without it an
  update smaller than half a bf16 ulp of the weight (2^-9 relative) vanishes, so small LRs stall.
* bf16 parameters with ``kahan=False``: plain bf16, for comparison; it lags at small LRs.

Limits: in bf16 the states round too; with ``beta2 = 0.999`` the second moment can no longer *decrease*
(``0.999 v`` rounds back to ``v``), so a too-small step is the failure mode, never a blow-up; beta2 <= 0.99
avoids it. Sparse gradients are not supported. FSDP2 (DTensor) parameters are updated shard by shard, with
one all-reduce for the RMS of all tensors of a step (1-D device meshes only).

``build_optimizer`` also offers ``adamw`` (torch's, fused on CUDA) and ``adafactor``
(``torch.optim.Adafactor``). ``build_scheduler`` returns a ``LambdaLR`` for ``cosine`` (linear warmup then
cosine to ``min_lr_ratio * lr``), ``inverse_sqrt`` (T5's ``1/sqrt(max(step, warmup))``), ``wsd``
(warmup-stable-decay: a linear decay over the last ``decay_fraction`` of training) and ``constant``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("adamwscale", "adamw", "adafactor")
SCHEDULES = ("cosine", "inverse_sqrt", "wsd", "constant")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


class AdamWScale(torch.optim.Optimizer):
    """Adam with per-tensor RMS-scaled steps; fp32 or bf16 (optionally Kahan-compensated) parameters."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        kahan: bool = True,
        scale_floor: float = 1e-3,
        kernel: bool | None = None,
    ):
        """``kernel``: update the tensors with the fused Triton kernel (``ops/adamw_scale.py``, one launch per
        dtype) instead of the foreach ops; default: on CUDA parameters."""
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            kahan=kahan,
            scale_floor=scale_floor,
        )
        super().__init__(params, defaults)
        self.kernel = kernel

    def __getstate__(self):
        # torch's Optimizer pickles defaults, state and param_groups only: keep the kernel choice too
        return {**super().__getstate__(), "kernel": self.kernel}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("kernel", None)

    def _init_state(self, p: torch.Tensor, kahan: bool) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)  # a CPU tensor: reading it never syncs the device
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if kahan and p.dtype in _LOW_PRECISION and "kahan_comp" not in state:
            state["kahan_comp"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None, skip_if: torch.Tensor | None = None):
        """``skip_if``: a 0-dim device tensor; when it is true (nonzero) the step changes nothing, step counts
        included. The kernel path decides on the device (no host sync); the foreach path reads it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        host_skip = None
        for group in self.param_groups:
            # tensors of one (device, dtype, step) go through the same foreach kernels; the fused kernel path
            # keeps step counts on the device, so its buckets need no step value
            buckets: dict[tuple, list] = defaultdict(list)
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("AdamWScale does not support sparse gradients")
                state = self._init_state(p, group["kahan"])
                dtensor = _is_dtensor(p)  # once per tensor and step, passed on to the calls below
                if self._use_kernel(p, dtensor):  # one launch per (device, dtype, gradient dtype)
                    buckets[(p.device, p.dtype, ("kernel", grad.dtype), dtensor)].append(p)
                    continue
                if skip_if is not None and host_skip is None:
                    host_skip = bool(skip_if)
                if host_skip:
                    continue
                state["step"] += 1
                buckets[(p.device, p.dtype, float(state["step"]), dtensor)].append(p)
            for (_, dtype, step, dtensor), params in buckets.items():
                use_kahan = group["kahan"] and dtype in _LOW_PRECISION
                if isinstance(step, tuple):
                    self._update_kernel(group, params, skip_if, use_kahan, dtensor)
                else:
                    self._update(group, params, step, use_kahan)
        return loss

    def _use_kernel(self, p: torch.Tensor, dtensor: bool | None = None) -> bool:
        dtensor = _is_dtensor(p) if dtensor is None else dtensor
        local = p.to_local() if dtensor else p
        wanted = self.kernel if self.kernel is not None else local.is_cuda
        grad = p.grad
        grad_ok = grad is None or (grad.to_local() if dtensor else grad).is_contiguous()
        return wanted and local.is_contiguous() and grad_ok

    def _update_kernel(
        self, group: dict, params: list[torch.Tensor], skip_if, use_kahan: bool, dtensor: bool
    ) -> None:
        from .ops.adamw_scale import adamw_scale_update_

        loc = _local if dtensor else (lambda t: t)
        device = loc(params[0]).device
        state = [self.state[p] for p in params]
        for s in state:  # step counts live on the device here (a checkpoint may bring them back on the CPU)
            if s["step"].device != device:
                s["step"] = s["step"].to(device, torch.float32)
        steps = [s["step"] for s in state]
        skip = (
            torch.zeros((), dtype=torch.int32, device=device)
            if skip_if is None
            else skip_if.to(device=device, dtype=torch.int32)
        )
        locals_ = [loc(p) for p in params]
        norms = torch._foreach_norm(locals_, 2, dtype=torch.float32)
        if dtensor:
            sq = torch.stack(norms).square()
            torch.distributed.all_reduce(sq, group=params[0].device_mesh.get_group())
            norms = list(sq.sqrt().unbind())
        adamw_scale_update_(
            locals_,
            [loc(p.grad) for p in params],
            [loc(s["exp_avg"]) for s in state],
            [loc(s["exp_avg_sq"]) for s in state],
            [loc(s["kahan_comp"]) for s in state] if use_kahan else None,
            steps,
            norms,
            [p.numel() for p in params],
            skip,
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            scale_floor=group["scale_floor"],
        )

    def _update(self, group: dict, params: list[torch.Tensor], step: float, use_kahan: bool) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        sharded = _is_dtensor(params[0])
        numels = [p.numel() for p in params]  # global sizes, also for FSDP shards
        # FSDP2 parameters are DTensors: the update is elementwise, so it runs on the local shards; only
        # the RMS needs the whole tensor (one all-reduce of the per-tensor sums of squares).
        state = [self.state[p] for p in params]
        exp_avgs = [_local(s["exp_avg"]) for s in state]
        exp_avg_sqs = [_local(s["exp_avg_sq"]) for s in state]
        grads = [_local(p.grad) for p in params]
        mesh = params[0].device_mesh if sharded else None
        params = [_local(p) for p in params]

        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        # per-tensor scale -lr * max(floor, rms(p)) / bias1, as 0-dim fp32 device tensors
        rms = torch._foreach_norm(params, 2, dtype=torch.float32)
        if sharded:
            sq = torch.stack(rms).square()
            torch.distributed.all_reduce(sq, group=mesh.get_group())
            rms = list(sq.sqrt().unbind())
        inv_sqrt_numel = [1.0 / math.sqrt(n) for n in numels]
        torch._foreach_mul_(rms, inv_sqrt_numel)
        torch._foreach_clamp_min_(rms, group["scale_floor"])
        torch._foreach_mul_(rms, -lr / bias1)

        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, math.sqrt(bias2))
        # fp16 cannot hold eps = 1e-8 (it rounds to 0 and 0 / 0 gives NaN where v underflowed): its smallest
        # subnormal instead
        torch._foreach_add_(denom, max(eps, 2.0**-24) if params[0].dtype == torch.float16 else eps)
        update = torch._foreach_div(exp_avgs, denom)
        del denom
        torch._foreach_mul_(update, [s.to(p.dtype) for s, p in zip(rms, params)])
        if wd != 0:
            torch._foreach_add_(update, params, alpha=-lr * wd)

        if not use_kahan:
            torch._foreach_add_(params, update)
            return
        # Kahan: comp holds what earlier roundings dropped. p_new = round(p + comp + u);
        # comp_new = comp + u - (p_new - p), computed exactly enough because comp << p.
        comps = [_local(s["kahan_comp"]) for s in state]
        torch._foreach_add_(comps, update)
        prev = torch._foreach_mul(params, 1.0)  # a copy
        torch._foreach_add_(params, comps)
        torch._foreach_sub_(prev, params)  # -(what was really applied)
        torch._foreach_add_(comps, prev)


_DTENSOR: list = []  # torch.distributed.tensor.DTensor, imported once (this runs for every tensor, every step)


def _is_dtensor(t: torch.Tensor) -> bool:
    if not _DTENSOR:
        from torch.distributed.tensor import DTensor

        _DTENSOR.append(DTensor)
    return isinstance(t, _DTENSOR[0])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def build_optimizer(
    name: str,
    params: Iterable,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    kahan: bool = True,
) -> torch.optim.Optimizer:
    """``adamwscale`` (default for T5), ``adamw`` (torch, fused on CUDA) or ``adafactor`` (torch).

    A step can be dropped on the device: ``AdamWScale.step(skip_if=t)``; torch's fused AdamW reads the
    ``found_inf`` attribute (``optimizer_step`` uses either; ``skip_step_on_device`` says whether it can)."""
    params = list(params)
    if name == "adamwscale":
        return AdamWScale(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, kahan=kahan)
    if name == "adamw":
        on_cuda = all(p.is_cuda for p in params if isinstance(p, torch.Tensor))
        return torch.optim.AdamW(
            params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=on_cuda or None
        )
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid choices: {', '.join(OPTIMIZERS)}")


def schedule_factor(
    name: str,
    step: int,
    max_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    decay_fraction: float = 0.2,
) -> float:
    """The LR multiplier at optimizer step ``step`` (0-based) of ``max_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    if name == "inverse_sqrt":
        return math.sqrt(max(warmup_steps, 1) / max(step, 1))
    if name == "cosine":
        span = max(1, max_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if name == "wsd":
        decay_steps = max(1, round(decay_fraction * max_steps))
        start = max(warmup_steps, max_steps - decay_steps)
        if step < start:
            return 1.0
        t = min(1.0, (step - start) / max(1, max_steps - start))
        return 1.0 - (1.0 - min_lr_ratio) * t
    raise ValueError(f"unknown schedule {name!r}; valid choices: {', '.join(SCHEDULES)}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    max_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    decay_fraction: float = 0.2,
) -> LambdaLR:
    schedule_factor(name, 0, max_steps)  # validates the name up front
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def factor(step: int) -> float:
        return schedule_factor(name, step, max_steps, warmup_steps, min_lr_ratio, decay_fraction)

    return LambdaLR(optimizer, factor)


def skip_step_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` can drop a step from a device flag without the host reading it."""
    if isinstance(optimizer, AdamWScale):
        return all(optimizer._use_kernel(p) for g in optimizer.param_groups for p in g["params"])
    return isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


def optimizer_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """One step unless the 0-dim device tensor ``skip`` is true; decided on the device where
    ``skip_step_on_device(optimizer)``, else by reading ``skip`` on the host."""
    if isinstance(optimizer, AdamWScale):
        optimizer.step(skip_if=skip)
    elif isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.to(torch.float32)  # torch's fused Adam(W) skips the step (and its count)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(skip):
        optimizer.step()
