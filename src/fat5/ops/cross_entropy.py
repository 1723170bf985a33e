"""Cross-entropy over the vocabulary with z-loss and label smoothing, mean over non-ignored tokens.

loss = sum_t [(1 - eps) * nll_t + eps * mean_v(-log p_tv)] / n_valid + z * sum_t lse_t^2 / n_valid
(PaLM's z-loss keeps the softmax normaliser near 1). Tokens whose label is ``ignore_index`` count nowhere;
with no valid token the loss is 0 (not NaN). Returns ``(loss, z_term)`` so the z-loss can be logged.
``linear_cross_entropy_ref`` is the same from hidden states and the output embedding.

Triton versions (registered through ``torch.library`` as ``fat5::cross_entropy_fwd/_bwd`` and
``fat5::linear_cross_entropy_fwd``, so ``torch.compile`` does not break the graph around them):
``cross_entropy_triton`` on given logits (forward saves only the per-row logsumexp) and
``linear_cross_entropy_triton``, which never holds the (T, V) logits: it runs over chunks of tokens, computes
each chunk's logits with cuBLAS, turns them into their gradient in place with one Triton kernel, and folds that
into grad_hidden / grad_weight at once (Liger-Kernel's fused linear cross-entropy). Limits: the returned
``z_term`` is for logging and carries no gradient (its gradient is inside ``loss``); a label outside the
vocabulary gives a NaN loss rather than an error (checking would synchronise with the host); the linear version
keeps grad_hidden and an fp32 grad_weight alive from forward to backward.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import Launcher, next_pow2
from .registration import op_pair


def cross_entropy_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be (tokens, vocab) and labels (tokens,), got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    logits = logits.float()
    valid = labels != ignore_index
    # the check reads a value back to the host: eager only, so compiled graphs stay whole
    bad_label = ((labels < 0) & valid) | (labels >= logits.shape[1])
    if not torch.compiler.is_compiling() and bool(bad_label.any()):
        raise ValueError(f"labels must be in [0, {logits.shape[1]}) or {ignore_index}")
    n_valid = valid.sum().clamp(min=1)
    lse = torch.logsumexp(logits, dim=-1)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    nll = lse - logits.gather(1, safe[:, None]).squeeze(1)
    if label_smoothing > 0:
        smooth = lse - logits.mean(dim=-1)
        nll = (1 - label_smoothing) * nll + label_smoothing * smooth
    w = valid.float()
    loss = (nll * w).sum() / n_valid
    z = z_loss * (lse.pow(2) * w).sum() / n_valid
    return loss + z, z


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} != embedding width {weight.shape[1]}")
    logits = hidden @ weight.t()
    return cross_entropy_ref(logits, labels, ignore_index, z_loss, label_smoothing)


# --------------------------------------------------------------------------------------------------------------
# Triton kernels. One program per token row walks the vocabulary in BLOCK_V slices: pass 1 keeps a running max
# and rescaled sum of exponentials (online logsumexp, one exp per logit), the label's logit and, with label
# smoothing, the row sum; pass 2 (optional) writes the gradient of the mean loss with respect to the logits,
#   dlogits = (softmax * (1 + 2 z lse) - (1 - eps) onehot - eps / V) * grad_scale,  0 on ignored rows,
# into any buffer: the logits themselves in the fused linear path (Liger-Kernel's in-place trick).
# grad_scale (= grad_output / n_valid) is read from device memory, so nothing waits on the host.
# The vocabulary size is a compile-time constant (one model has one vocabulary, and the CPU interpreter with
# numpy >= 2.4 cannot run loops with runtime bounds). A label outside [0, V) that is not ignore_index makes the
# loss NaN instead of a host-synchronising check.
# --------------------------------------------------------------------------------------------------------------

_MAX_BLOCK_V = 4096
# The fused linear path computes this many logits at a time (2**26: 128 MiB in bf16): for vocab 32128 that is
# 2048 tokens a chunk, large enough for cuBLAS to run at full rate, small next to the full (T, V) logits.
_CHUNK_ELEMENTS = 2**26


@triton.jit
def _ce_grad_row(
    base, grad_base, label, lse, valid, scale, z_loss, smoothing,
    N_COLS: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    # fold every per-row constant so the loop body is one exp and one fma: g = p * a - b (- c at the label)
    a = (1.0 + 2.0 * z_loss * lse) * scale
    b = smoothing / N_COLS * scale
    c = (1.0 - smoothing) * scale
    for start in range(0, N_COLS, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < N_COLS
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) * a - b - tl.where(cols == label, c, 0.0)
        # ignored rows get exact zeros even when their logits are inf or NaN
        g = tl.where(valid, g, 0.0)
        tl.store(grad_base + cols, g.to(grad_base.dtype.element_ty), mask=mask)


@triton.jit
def _ce_fwd_kernel(
    LOGITS, stride_l, LABELS, LOSS, ZROW, LSE, GRAD, stride_g, SCALE, ignore_index, z_loss, smoothing,
    N_COLS: tl.constexpr, SMOOTH: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    label = tl.load(LABELS + row).to(tl.int64)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < N_COLS)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    total = tl.zeros([], tl.float32)
    for start in range(0, N_COLS, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < N_COLS
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        if SMOOTH:
            total += tl.sum(tl.where(mask, x, 0.0), axis=0)
    lse = m + tl.log(s)
    x_label = tl.load(base + tl.where(in_range, label, 0)).to(tl.float32)
    loss = (1.0 - smoothing) * (lse - x_label)
    if SMOOTH:
        loss += smoothing * (lse - total / N_COLS)
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(ZROW + row, tl.where(valid, z_loss * lse * lse, 0.0))
    tl.store(LSE + row, lse)
    if WRITE_GRAD:
        scale = tl.load(SCALE)
        _ce_grad_row(
            base, GRAD + row * stride_g, label, lse, valid, scale, z_loss, smoothing, N_COLS, BLOCK_V
        )


@triton.jit
def _ce_bwd_kernel(
    LOGITS, stride_l, LABELS, LSE, GRAD, stride_g, SCALE, ignore_index, z_loss, smoothing,
    N_COLS: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row).to(tl.int64)
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE)
    _ce_grad_row(
        LOGITS + row * stride_l,
        GRAD + row * stride_g,
        label,
        lse,
        label != ignore_index,
        scale,
        z_loss,
        smoothing,
        N_COLS,
        BLOCK_V,
    )


_CE_FWD, _CE_BWD = Launcher(_ce_fwd_kernel), Launcher(_ce_bwd_kernel)


def _launch_ce_fwd(logits, labels, loss_rows, z_rows, lse, grad, scale, ignore_index, z_loss, smoothing):
    """Per-row kernel over logits (n, V) with unit column stride; grad (n, V) or None (no gradient pass)."""
    n, v = logits.shape
    if n == 0:
        return
    block_v = min(_MAX_BLOCK_V, next_pow2(v))
    _CE_FWD[(n,)](
        logits, logits.stride(0), labels, loss_rows, z_rows, lse,
        grad if grad is not None else logits, grad.stride(0) if grad is not None else 0,
        scale, ignore_index, z_loss, smoothing,
        N_COLS=v, SMOOTH=smoothing > 0, WRITE_GRAD=grad is not None, BLOCK_V=block_v, num_warps=8,
    )  # fmt: skip


def _inv_n_valid(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    # on device: dividing by a count read back to the host would stall the stream every step
    return 1.0 / (labels != ignore_index).sum().clamp(min=1).to(torch.float32)


def _check_labels(logits_rows: int, labels: torch.Tensor) -> None:
    if labels.dim() != 1 or labels.shape[0] != logits_rows or labels.dtype.is_floating_point:
        raise ValueError(
            f"labels must be integer (tokens,) = ({logits_rows},), got {labels.dtype} {tuple(labels.shape)}"
        )


# ---- cross-entropy on given logits: forward saves lse (4 bytes a row); backward is one read + one write pass ----


def _ce_fwd_impl(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, z_loss: float, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = logits.shape[0]
    loss_rows = torch.empty(n, dtype=torch.float32, device=logits.device)
    z_rows, lse = torch.empty_like(loss_rows), torch.empty_like(loss_rows)
    inv_n = _inv_n_valid(labels, ignore_index)
    _launch_ce_fwd(logits, labels, loss_rows, z_rows, lse, None, inv_n, ignore_index, z_loss, label_smoothing)
    z = z_rows.sum() * inv_n
    return loss_rows.sum() * inv_n + z, z, lse


def _ce_fwd_fake(logits, labels, ignore_index, z_loss, label_smoothing):
    scalar = logits.new_empty((), dtype=torch.float32)
    return scalar, torch.empty_like(scalar), logits.new_empty(logits.shape[0], dtype=torch.float32)


def _ce_bwd_impl(
    grad_loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
    ignore_index: int, z_loss: float, label_smoothing: float,
) -> torch.Tensor:  # fmt: skip
    n, v = logits.shape
    grad = torch.empty_like(logits)
    if n:
        scale = grad_loss.to(torch.float32) * _inv_n_valid(labels, ignore_index)
        _CE_BWD[(n,)](
            logits, logits.stride(0), labels, lse, grad, grad.stride(0), scale, ignore_index, z_loss,
            label_smoothing, N_COLS=v, BLOCK_V=min(_MAX_BLOCK_V, next_pow2(v)), num_warps=8,
        )  # fmt: skip
    return grad


def _ce_bwd_fake(grad_loss, logits, labels, lse, ignore_index, z_loss, label_smoothing):
    return torch.empty_like(logits)


def _ce_setup(ctx, inputs, output):
    logits, labels, ctx.ignore_index, ctx.z_loss, ctx.label_smoothing = inputs
    _, z, lse = output
    # z_term is for logging: its gradient is already part of loss's, so it is returned non-differentiable
    ctx.mark_non_differentiable(z, lse)
    ctx.save_for_backward(logits, labels, lse)


def _ce_backward(ctx, grad_loss, grad_z, grad_lse, bwd):
    logits, labels, lse = ctx.saved_tensors
    if grad_loss is None:  # only the logging terms were used
        return None, None, None, None, None
    grad = bwd(grad_loss, logits, labels, lse, ctx.ignore_index, ctx.z_loss, ctx.label_smoothing)
    return grad, None, None, None, None


_ce, _ce_fwd, _ce_bwd = op_pair(
    "cross_entropy", _ce_fwd_impl, _ce_fwd_fake, _ce_bwd_impl, _ce_bwd_fake, _ce_setup, _ce_backward
)


def cross_entropy_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cross_entropy_ref with Triton kernels; the returned z_term carries no gradient (it is in loss)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (tokens, vocab), got {tuple(logits.shape)}")
    _check_labels(logits.shape[0], labels)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    loss, z, _ = _ce(logits, labels.contiguous(), ignore_index, float(z_loss), float(label_smoothing))
    return loss, z


# ---- fused linear + cross-entropy: gradients computed chunk by chunk during forward, scaled in backward ----


@functools.cache
def _cuda_addmm_fp32_out_works(device: torch.device) -> bool:
    """Whether torch.addmm(fp32, bf16, bf16, out_dtype=float32) (cuBLAS, fp32 epilogue) runs and is right here."""
    if "dtype" not in torch.ops.aten.addmm.overloads():
        return False
    a = torch.randn(64, 32, device=device, dtype=torch.bfloat16)
    b = torch.randn(32, 16, device=device, dtype=torch.bfloat16)
    c = torch.randn(64, 16, device=device)
    try:
        got = torch.addmm(c, a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return got.dtype == torch.float32 and torch.allclose(got, c + a.float() @ b.float(), atol=1e-2, rtol=1e-3)


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc (fp32) + a @ b with a, b in the input dtype; fp32 accumulation across chunks."""
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    if acc.is_cuda and _cuda_addmm_fp32_out_works(acc.device):
        # cuBLAS adds the product to fp32 acc in its epilogue: no rounded (V, d) temporary
        return torch.addmm(acc, a, b, out_dtype=torch.float32)
    return acc.add_(torch.mm(a, b).float())


def _chunk_rows(v: int) -> int:
    rows = max(1, _CHUNK_ELEMENTS // max(v, 1))
    return 1 << (rows.bit_length() - 1)  # a power of two: aligned, few distinct matmul shapes


@torch.library.custom_op("fat5::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, z_loss: float,
    label_smoothing: float, need_grad_hidden: bool, need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Returns (loss, z_term, grad_hidden, grad_weight (fp32)) for grad_output = 1; unneeded grads are empty."""
    t, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    loss_rows = torch.empty(t, dtype=torch.float32, device=dev)
    z_rows, lse = torch.empty_like(loss_rows), torch.empty_like(loss_rows)
    inv_n = _inv_n_valid(labels, ignore_index)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_grad_weight else None
    write_grad = need_grad_hidden or need_grad_weight
    chunk = _chunk_rows(v)
    for s in range(0, t, chunk):
        e = min(s + chunk, t)
        h = hidden[s:e]
        logits = h @ weight.t()  # (e-s, V) in the input dtype: cuBLAS, fp32 accumulation inside
        _launch_ce_fwd(
            logits,
            labels[s:e],
            loss_rows[s:e],
            z_rows[s:e],
            lse[s:e],
            logits if write_grad else None,
            inv_n,
            ignore_index,
            z_loss,
            label_smoothing,
        )
        # logits now hold dloss/dlogits for this chunk
        if need_grad_hidden:
            torch.mm(logits, weight, out=grad_hidden[s:e])
        if need_grad_weight:
            grad_weight = _accumulate_fp32(grad_weight, logits.t(), h)
    z = z_rows.sum() * inv_n
    if grad_weight is None:
        grad_weight = weight.new_empty(0, dtype=torch.float32)
    return loss_rows.sum() * inv_n + z, z, grad_hidden, grad_weight


@_lce_fwd.register_fake
def _(hidden, weight, labels, ignore_index, z_loss, label_smoothing, need_grad_hidden, need_grad_weight):
    scalar = hidden.new_empty((), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0)
    shape = weight.shape if need_grad_weight else (0,)
    return scalar, torch.empty_like(scalar), grad_hidden, weight.new_empty(shape, dtype=torch.float32)


def _lce_setup(ctx, inputs, output):
    weight = inputs[1]
    ctx.need_grad_hidden, ctx.need_grad_weight = inputs[6], inputs[7]
    ctx.weight_dtype = weight.dtype
    _, z, grad_hidden, grad_weight = output
    ctx.mark_non_differentiable(z, grad_hidden, grad_weight)
    # the stored gradients are outputs too: materialised, their (unused) gradients would be zero fills as large
    # as the hidden states and the embedding, on every backward
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_hidden, grad_weight)


def _lce_backward(ctx, grad_loss, grad_z, grad_gh, grad_gw):
    grad_hidden, grad_weight = ctx.saved_tensors
    if grad_loss is None:  # only the z-loss term (logging) was used
        return None, None, None, None, None, None, None, None
    # the stored gradients are for grad_output = 1; a 0-dim fp32 factor keeps each tensor's dtype
    dh = grad_hidden * grad_loss if ctx.need_grad_hidden else None
    dw = (grad_weight * grad_loss).to(ctx.weight_dtype) if ctx.need_grad_weight else None
    return dh, dw, None, None, None, None, None, None


_lce_fwd.register_autograd(_lce_backward, setup_context=_lce_setup)


def linear_cross_entropy_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_cross_entropy_ref without materialising the (T, V) logits; z_term carries no gradient.

    hidden (T, d), weight (V, d), labels (T,). The gradients are computed during forward (when grad mode is on
    and an input requires grad) and held until backward: grad_hidden in hidden's dtype, grad_weight in fp32.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (tokens, d) and weight (vocab, d), got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype; cast one first"
        )
    _check_labels(hidden.shape[0], labels)
    grad_on = torch.is_grad_enabled()
    loss, z, _, _ = _lce_fwd(
        hidden.contiguous(), weight.contiguous(), labels.contiguous(), ignore_index, float(z_loss),
        float(label_smoothing), grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
    )  # fmt: skip
    return loss, z
