"""Encoder-only task heads: sequence classification / regression, token classification, extractive QA.

Each head is the fat5 encoder (``shared`` embedding + encoder ``Stack``, the same weights and names as
``FAT5EncoderModel``, so an encoder or a full seq2seq checkpoint loads into a head: the decoder weights are
reported as unexpected and the head layers as newly initialised) followed by a small task layer. Outputs and
losses follow ``transformers`` exactly: ``SequenceClassifierOutput``, ``TokenClassifierOutput`` and
``QuestionAnsweringModelOutput``, with ``loss`` when labels are given.

Sequence pooling (``config.pooling``), always computed from ``attention_mask`` so left and right padding
both work and padded tokens never change the result:
  * ``"mean"`` (default): mean of the final hidden states over the real tokens (mask = 1);
  * ``"first"``: the hidden state of the first real token;
  * ``"eos"``: the hidden state of the last real token (T5 tokenizers append ``</s>``, so this is the EOS,
    as in ``transformers.T5ForSequenceClassification``).
The pooled vector goes through dropout -> dense(d_model) -> tanh -> dropout -> out_proj(num_labels), like
T5's ``T5ClassificationHead``. Dropout is ``config.classifier_dropout``.

Problem type (``config.problem_type``, else inferred as in transformers): ``num_labels == 1`` -> regression
(MSE); integer labels -> single-label classification (cross-entropy); float labels -> multi-label
(BCE with logits).

Limits: no ``output_attentions`` (the fused attention never materialises attention weights) and no
per-layer ``output_hidden_states``; sequence classification takes one example per row (packed rows with
``segment_ids`` would mix documents in the pooling, so they are refused); token classification and QA accept
``segment_ids``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import (
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from .config import FAT5Config
from .model import FAT5PreTrainedModel, Stack, _embed

POOLINGS = ("mean", "first", "eos")


def _head_linear(d_in: int, d_out: int) -> nn.Linear:
    lin = nn.Linear(d_in, d_out)
    lin._fat5_head = True  # FAT5PreTrainedModel._init_weights: normal(0, d_model**-0.5), zero bias
    return lin


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, L, D) hidden states -> (B, D), over real tokens only (attention_mask 1 = real)."""
    if how not in POOLINGS:
        raise ValueError(f"unknown pooling {how!r}; valid choices: {', '.join(POOLINGS)}")
    b, length, _ = hidden.shape
    if attention_mask is None:
        if how == "mean":
            return hidden.mean(dim=1)
        return hidden[:, 0] if how == "first" else hidden[:, -1]
    mask = attention_mask.to(torch.bool)
    if mask.shape != (b, length):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}, expected {(b, length)} like input_ids"
        )
    n_real = mask.sum(dim=1)
    if bool((n_real == 0).any()):
        raise ValueError("a row of attention_mask has no real token (all zeros): nothing to pool")
    if how == "mean":
        # masked_fill, not multiply: padded positions may hold anything, even inf/nan
        summed = hidden.masked_fill(~mask[..., None], 0.0).sum(dim=1)
        return summed / n_real[:, None].to(hidden.dtype)
    if how == "first":
        idx = mask.int().argmax(dim=1)  # first True
    else:
        idx = length - 1 - mask.flip(1).int().argmax(dim=1)  # last True
    return hidden[torch.arange(b, device=hidden.device), idx]


def _check_unsupported(output_attentions, output_hidden_states, kwargs) -> None:
    if output_attentions:
        raise ValueError(
            "fat5 does not return attention weights: its fused attention never materialises them"
        )
    if output_hidden_states:
        raise ValueError(
            "fat5 heads return only the final hidden state; per-layer hidden states are not kept"
        )
    # Trainer / PEFT pass these; anything else is a caller mistake that must not vanish silently
    unknown = set(kwargs) - {"num_items_in_batch", "use_cache", "token_type_ids"}
    if unknown:
        raise TypeError(f"unexpected arguments to a fat5 head: {', '.join(sorted(unknown))}")
    if kwargs.get("token_type_ids") is not None and bool(kwargs["token_type_ids"].any()):
        raise ValueError("fat5 has no token type embeddings; drop token_type_ids (or pass all zeros)")


class _FAT5EncoderWithHead(FAT5PreTrainedModel):
    """The encoder of FAT5EncoderModel; subclasses add one task layer."""

    # losses here are means over the batch; Trainer must not expect num_items_in_batch handling
    accepts_loss_kwargs = False

    def __init__(self, config: FAT5Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, is_decoder=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def set_input_embeddings(self, emb: nn.Embedding) -> None:
        self.shared = emb

    def _encode(self, input_ids, attention_mask, segment_ids, inputs_embeds) -> torch.Tensor:
        return self.encoder(_embed(self.shared, input_ids, inputs_embeds), attention_mask, segment_ids)


class FAT5ClassificationHead(nn.Module):
    """pooled (B, D) -> dropout -> dense -> tanh -> dropout -> out_proj -> (B, num_labels)."""

    def __init__(self, config: FAT5Config):
        super().__init__()
        self.dense = _head_linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.out_proj = _head_linear(config.d_model, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.dense(self.dropout(pooled)))
        return self.out_proj(self.dropout(h))


def sequence_classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, config: FAT5Config
) -> torch.Tensor:
    """transformers' rule: problem_type if set, else regression / single-label / multi-label by shapes and dtype."""
    num_labels = config.num_labels
    problem = config.problem_type
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    logits = logits.float()
    labels = labels.to(logits.device)
    if problem == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.view(-1), labels.reshape(-1).float())
        return F.mse_loss(logits, labels.float())
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    raise ValueError(
        f"unknown problem_type {problem!r}; valid: regression, single_label_classification, "
        "multi_label_classification"
    )


class FAT5ForSequenceClassification(_FAT5EncoderWithHead):
    """Encoder -> pooling (config.pooling) -> classification head. See the module docstring."""

    def __init__(self, config: FAT5Config):
        super().__init__(config)
        self.classifier = FAT5ClassificationHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        _check_unsupported(output_attentions, output_hidden_states, kwargs)
        if segment_ids is not None:
            raise ValueError(
                "sequence classification pools one example per row; unpack the inputs (no segment_ids)"
            )
        h = self._encode(input_ids, attention_mask, None, inputs_embeds)
        logits = self.classifier(pool(h, attention_mask, self.config.pooling))
        loss = None if labels is None else sequence_classification_loss(logits, labels, self.config)
        out = SequenceClassifierOutput(loss=loss, logits=logits)
        return out if return_dict is not False else out.to_tuple()


class FAT5ForTokenClassification(_FAT5EncoderWithHead):
    """Encoder -> dropout -> linear(num_labels) per token; cross-entropy ignoring label -100."""

    def __init__(self, config: FAT5Config):
        super().__init__(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = _head_linear(config.d_model, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TokenClassifierOutput | tuple:
        _check_unsupported(output_attentions, output_hidden_states, kwargs)
        h = self._encode(input_ids, attention_mask, segment_ids, inputs_embeds)
        logits = self.classifier(self.dropout(h))  # (B, L, num_labels)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(
                    f"labels have shape {tuple(labels.shape)}, expected {tuple(logits.shape[:2])}"
                )
            loss = F.cross_entropy(
                logits.float().view(-1, self.num_labels), labels.to(logits.device).view(-1), ignore_index=-100
            )
        out = TokenClassifierOutput(loss=loss, logits=logits)
        return out if return_dict is not False else out.to_tuple()


class FAT5ForQuestionAnswering(_FAT5EncoderWithHead):
    """Encoder -> linear(2) per token = span start / end logits; loss as transformers' QA models.

    Positions outside the sequence are clamped to ``seq_len`` and ignored (transformers' convention for
    answers truncated away). Padded positions are not masked out of the logits (as in transformers): mask
    them when decoding spans.
    """

    def __init__(self, config: FAT5Config):
        super().__init__(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.qa_outputs = _head_linear(config.d_model, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> QuestionAnsweringModelOutput | tuple:
        _check_unsupported(output_attentions, output_hidden_states, kwargs)
        h = self._encode(input_ids, attention_mask, segment_ids, inputs_embeds)
        logits = self.qa_outputs(self.dropout(h))  # (B, L, 2)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.shape[1]
            start = start_positions.to(logits.device).reshape(-1).clamp(0, ignored)
            end = end_positions.to(logits.device).reshape(-1).clamp(0, ignored)
            loss = (
                F.cross_entropy(start_logits.float(), start, ignore_index=ignored)
                + F.cross_entropy(end_logits.float(), end, ignore_index=ignored)
            ) / 2
        elif (start_positions is None) != (end_positions is None):
            raise ValueError("give both start_positions and end_positions (or neither)")
        out = QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits)
        return out if return_dict is not False else out.to_tuple()


__all__ = [
    "FAT5ForSequenceClassification",
    "FAT5ForTokenClassification",
    "FAT5ForQuestionAnswering",
    "FAT5ClassificationHead",
    "pool",
]
