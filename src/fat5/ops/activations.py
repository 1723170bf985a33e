"""The feed-forward's elementwise part: act(g) * u for gated variants, act(g) otherwise.

Activations: ``gelu_tanh`` (HF ``gelu_new``, used by T5 v1.1 gated-gelu), ``gelu`` (exact), ``silu``, ``relu``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
