"""The one place that picks an implementation for every op: Triton kernels on CUDA, references elsewhere.

``set_backend("reference")`` forces the plain-PyTorch path everywhere (for A/B checks); ``"auto"`` (default)
uses kernels on CUDA tensors. The model calls only the public functions below.
"""

from __future__ import annotations

import torch

from .activations import gated_act_packed_ref, gated_act_packed_triton, gated_act_ref, gated_act_triton
from .attention import attention_ref, segment_ids_from_cu_seqlens
from .attention_triton import flash_attention
from .cross_entropy import (
    cross_entropy_ref,
    cross_entropy_triton,
    linear_cross_entropy_ref,
    linear_cross_entropy_triton,
)
from .rmsnorm import rms_norm_ref, rms_norm_triton

__all__ = [
    "attention",
    "rms_norm",
    "cross_entropy",
    "linear_cross_entropy",
    "gated_act",
    "gated_act_packed",
    "set_backend",
    "get_backend",
    "segment_ids_from_cu_seqlens",
]

_BACKENDS = ("auto", "reference", "triton")
_backend = "auto"


def set_backend(name: str) -> None:
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; valid choices: {', '.join(_BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


def use_kernels(t: torch.Tensor) -> bool:
    return _backend == "triton" or (_backend == "auto" and t.is_cuda)


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    # custom ops are opaque to autocast: apply its dtype ourselves where the reference would get it
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def attention(q, k, v, **kw) -> torch.Tensor:
    """Attention with position bias and masks; semantics in ops/attention.py (attention_ref)."""
    if use_kernels(q) and kw.get("dropout_p", 0.0) == 0.0:
        return flash_attention(q, k, v, **kw)
    return attention_ref(q, k, v, **kw)


def rms_norm(x, weight, eps=1e-6, residual=None, out_dtype=None):
    """T5 RMSNorm; with ``residual`` returns (norm(x + residual), x + residual); normed output in
    ``out_dtype`` (default: the dtype of x + residual)."""
    if use_kernels(x):
        return rms_norm_triton(x, weight, eps, residual, out_dtype)
    return rms_norm_ref(x, weight, eps, residual, out_dtype)


def cross_entropy(logits, labels, ignore_index=-100, z_loss=0.0, label_smoothing=0.0):
    """(loss, z_term): mean over non-ignored labels, see ops/cross_entropy.py."""
    if use_kernels(logits):
        return cross_entropy_triton(logits, labels, ignore_index, z_loss, label_smoothing)
    return cross_entropy_ref(logits, labels, ignore_index, z_loss, label_smoothing)


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, z_loss=0.0, label_smoothing=0.0):
    """cross_entropy(hidden @ weight.T, labels) without materialising the logits on the kernel path."""
    if use_kernels(hidden):
        dt = _autocast_dtype(hidden)
        if dt is not None:
            hidden, weight = hidden.to(dt), weight.to(dt)
        elif hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        return linear_cross_entropy_triton(hidden, weight, labels, ignore_index, z_loss, label_smoothing)
    return linear_cross_entropy_ref(hidden, weight, labels, ignore_index, z_loss, label_smoothing)


def gated_act(gate, up, act):
    """act(gate) * up (up may be None): the feed-forward's elementwise part."""
    if use_kernels(gate) and (up is None or up.dtype == gate.dtype):
        return gated_act_triton(gate, up, act)
    return gated_act_ref(gate, up, act)


def gated_act_packed(gu, act):
    """act(gate) * up of gu = cat([gate, up], -1), the output of one packed input projection."""
    if use_kernels(gu):
        return gated_act_packed_triton(gu, act)
    return gated_act_packed_ref(gu, act)
