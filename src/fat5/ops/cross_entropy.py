"""Cross-entropy over the vocabulary with z-loss and label smoothing, mean over non-ignored tokens.

loss = sum_t [(1 - eps) * nll_t + eps * mean_v(-log p_tv)] / n_valid + z * sum_t lse_t^2 / n_valid
(PaLM's z-loss keeps the softmax normaliser near 1). Tokens whose label is ``ignore_index`` count nowhere;
with no valid token the loss is 0 (not NaN). Returns ``(loss, z_term)`` so the z-loss can be logged.
``linear_cross_entropy_ref`` is the same from hidden states and the output embedding.
"""

from __future__ import annotations

import torch


def cross_entropy_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (tokens, vocab) and labels (tokens,), got {tuple(logits.shape)}, {tuple(labels.shape)}")
    logits = logits.float()
    valid = labels != ignore_index
    if bool(((labels < 0) & valid).any()) or bool((labels >= logits.shape[1]).any()):
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
