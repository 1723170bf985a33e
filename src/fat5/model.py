"""The T5-family encoder-decoder: attention, feed-forward, blocks, stacks, and the model heads.

Pre-norm T5 blocks (RMSNorm, no biases, residual around attention and feed-forward) with HF T5 semantics
where a T5 checkpoint is loaded: no 1/sqrt(d) attention scaling by default, one relative-bias table per
stack shared by all layers, the d_model**-0.5 output rescaling for tied-embedding T5 v1.0, HF's init.
Every numerical op goes through ``fat5.ops`` (kernels on CUDA, references elsewhere).

Masks: ``attention_mask`` / ``decoder_attention_mask`` are key-padding masks (1 = real token) applied in
every attention, cross-attention included; ``segment_ids`` / ``decoder_segment_ids`` restrict attention to
tokens of the same packed document (decoder token of segment s sees encoder tokens of segment s).
Limits: attention dropout is only supported on the reference path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from . import ops
from .config import FAT5Config
from .positions import FIRE, RotaryEmbedding, alibi_slopes


class RMSNorm(nn.Module):
    # Under autocast, a norm whose output feeds exactly one linear layer (the caller says so with
    # ``to_linear``) writes that output in the autocast dtype: the values the layer's input cast would make,
    # without the fp32 copy and the cast pass. With several consumers the output stays fp32, so that their
    # input gradients are summed in fp32 as they would be without this shortcut.
    low_precision_out = True

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, to_linear: bool = False):
        """norm(x), or with ``residual``: (norm(x + residual), x + residual) in one fused pass."""
        out_dtype = ops._autocast_dtype(x) if to_linear and self.low_precision_out else None
        return ops.rms_norm(x, self.weight, self.eps, residual, out_dtype)


@dataclass
class AttentionContext:
    """Per-stack attention inputs shared by every layer of one forward pass."""

    key_padding_mask: torch.Tensor | None = None  # (B, N) bool, self-attention keys
    segment_ids: torch.Tensor | None = None  # (B, M)
    q_offset: int | torch.Tensor = 0  # absolute position of the first query
    rel_table: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # FIRE: (1, H, M, N)
    rope: RotaryEmbedding | None = None
    # cross-attention
    enc_key_padding_mask: torch.Tensor | None = None
    enc_segment_ids: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, config: FAT5Config, causal: bool, cross: bool):
        super().__init__()
        self.n_heads, self.d_kv = config.num_heads, config.d_kv
        inner = self.n_heads * self.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.causal, self.cross = causal, cross
        self.scale = config.attention_scale
        self.max_distance = config.relative_attention_max_distance
        self.dropout = config.dropout_rate

    def _fused(self, *names: str) -> bool:
        # PEFT (LoRA) or quantisation wrappers replace the projections: call them so their extra paths run
        return all(type(getattr(self, n)) is nn.Linear for n in names)

    def single_input_gemm(self) -> bool:
        """Whether the input x goes into one GEMM only (fused q/k/v, or q alone for cross-attention)."""
        return self._fused("q") if self.cross else self._fused("q", "k", "v")

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, l, _ = x.shape
        return x.view(b, l, self.n_heads, self.d_kv).transpose(1, 2)  # (B, H, L, D), a view

    def _packed_kv(self, enc: torch.Tensor) -> torch.Tensor:
        # one GEMM for k and v: (B, N, 2, H, D), the packed layout ops.attention takes as (k, None)
        b, n, _ = enc.shape
        return F.linear(enc, torch.cat([self.k.weight, self.v.weight])).view(b, n, 2, self.n_heads, self.d_kv)

    def cross_kv(self, enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values (B, H, N, D) of encoder states ``enc`` (B, N, d_model); what the
        cross branch of ``forward`` computes (and caches) when the cache holds none."""
        if not self._fused("k", "v"):
            return self._heads(self.k(enc)), self._heads(self.v(enc))
        kv = self._packed_kv(enc)
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    def forward(self, x, ctx: AttentionContext, kv_input=None, cache=None, layer_idx: int = 0):
        if self.cross:
            q = self._heads(self.q(x))
            if cache is None and self._fused("k", "v"):
                # packed keys and values: the attention backward writes their gradient in this layout
                k, v = self._packed_kv(kv_input), None
            else:
                kv = cache.get_cross(layer_idx) if cache is not None else None
                if kv is None:
                    kv = self.cross_kv(kv_input)
                    if cache is not None:
                        cache.set_cross(layer_idx, *kv)
                k, v = kv
            q_seg = ctx.segment_ids if ctx.enc_segment_ids is not None else None
            b, _, m, _ = q.shape
            r = b // k.shape[0]
            if r * k.shape[0] != b:
                raise ValueError(
                    f"cross-attention: {b} query rows is not a multiple of {k.shape[0]} key/value rows"
                )
            if r > 1:
                # K/V once per input, shared by its r consecutive query rows (beams / returned sequences):
                # stack those rows' queries along the query axis, (B*r, H, M, D) -> (B, H, r*M, D) (a view).
                # Exact: cross-attention has no position bias and no causal mask, every query row is
                # independent; the key padding mask (and encoder segment ids) are per input, (B, N).
                q = q.unflatten(0, (-1, r)).transpose(1, 2).flatten(2, 3)
                if q_seg is not None:
                    q_seg = q_seg.reshape(-1, r * m)
            out = ops.attention(
                q,
                k,
                v,
                scale=self.scale,
                key_padding_mask=ctx.enc_key_padding_mask,
                q_segment_ids=q_seg,
                kv_segment_ids=ctx.enc_segment_ids,
                dropout_p=self.dropout if self.training else 0.0,
            )
            if r > 1:  # (B, H, r*M, D) -> (B*r, M, H*D)
                out = out.unflatten(2, (r, m)).permute(0, 2, 3, 1, 4).reshape(b, m, self.n_heads * self.d_kv)
                return self.o(out)
        else:
            # one GEMM for q, k and v (the weights stay separate parameters, as in T5 checkpoints)
            if self._fused("q", "k", "v"):
                w = torch.cat([self.q.weight, self.k.weight, self.v.weight])
                b, m, _ = x.shape
                qkv = F.linear(x, w).view(b, m, 3, self.n_heads, self.d_kv)
                if ctx.rope is None and cache is None:
                    # packed: the attention backward writes d(qkv) in place, no gather of three gradients
                    q, k, v = qkv, None, None
                else:
                    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, M, D) strided views
            else:
                q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
            if ctx.rope is not None:
                m = x.shape[1]
                q = ctx.rope(q, torch.arange(m, device=x.device) + ctx.q_offset)
                k = ctx.rope(k, torch.arange(m, device=x.device) + ctx.q_offset)
            key_padding_mask = ctx.key_padding_mask
            if cache is not None:
                k, v, key_padding_mask = cache.update(layer_idx, k, v, key_padding_mask)
            out = ops.attention(
                q,
                k,
                v,
                scale=self.scale,
                causal=self.causal,
                q_offset=ctx.q_offset,
                bias=ctx.bias,
                rel_table=ctx.rel_table,
                rel_bidirectional=not self.causal,
                rel_max_distance=self.max_distance,
                alibi_slopes=ctx.alibi_slopes,
                key_padding_mask=key_padding_mask,
                q_segment_ids=ctx.segment_ids if cache is None else None,
                kv_segment_ids=ctx.segment_ids if cache is None else None,
                dropout_p=self.dropout if self.training else 0.0,
            )
        b, _, m, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, m, self.n_heads * self.d_kv))


class FeedForward(nn.Module):
    def __init__(self, config: FAT5Config):
        super().__init__()
        self.gated = config.is_gated_act
        act = config.dense_act_fn
        # HF maps gated-gelu to gelu_new (tanh approximation) and plain gelu to the exact erf form
        self.act = "gelu_tanh" if (self.gated and act == "gelu") else act
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)

    def single_input_gemm(self) -> bool:
        """Whether the input x goes into one GEMM only (wi, or wi_0 and wi_1 packed)."""
        names = ("wi_0", "wi_1") if self.gated else ("wi",)
        return all(type(getattr(self, n)) is nn.Linear for n in names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated and self.single_input_gemm():
            # one GEMM for both input projections (separate parameters, as in T5 checkpoints)
            gu = F.linear(x, torch.cat([self.wi_0.weight, self.wi_1.weight]))
            h = ops.gated_act_packed(gu, self.act)
        elif self.gated:
            h = ops.gated_act(self.wi_0(x), self.wi_1(x), self.act)
        else:
            h = ops.gated_act(self.wi(x), None, self.act)
        h = self.dropout(h)
        if h.dtype != self.wo.weight.dtype and not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


class Block(nn.Module):
    def __init__(self, config: FAT5Config, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.attn_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.attn = Attention(config, causal=is_decoder, cross=False)
        if is_decoder:
            self.cross_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
            self.cross_attn = Attention(config, causal=False, cross=True)
        self.ff_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.ff = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, ctx: AttentionContext, enc=None, cache=None, layer_idx: int = 0, pending=None):
        """Returns (x, out): the residual stream and this block's last output, not yet added to it. Every
        residual add is fused into the norm that follows it (h = norm(x + out), x = x + out in one pass):
        ``pending``, the previous block's ``out``, is added by this block's first norm, and the stack's
        final norm adds the last one."""
        if pending is None:
            h = self.attn_norm(x, to_linear=self.attn.single_input_gemm())
        else:
            h, x = self.attn_norm(pending, x, to_linear=self.attn.single_input_gemm())
        out = self.dropout(self.attn(h, ctx, cache=cache, layer_idx=layer_idx))
        if self.is_decoder:
            h, x = self.cross_norm(out, x, to_linear=self.cross_attn.single_input_gemm())
            out = self.dropout(self.cross_attn(h, ctx, enc, cache, layer_idx))
        h, x = self.ff_norm(out, x, to_linear=self.ff.single_input_gemm())
        return x, self.dropout(self.ff(h))


class Stack(nn.Module):
    """Embeddings in, final-normed hidden states out; owns the stack's positional encoding."""

    def __init__(self, config: FAT5Config, is_decoder: bool):
        super().__init__()
        self.config, self.is_decoder = config, is_decoder
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.layers = nn.ModuleList([Block(config, is_decoder) for _ in range(n)])
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        pe = config.position_encoding
        self.relative_attention_bias = (
            nn.Embedding(config.relative_attention_num_buckets, config.num_heads) if pe == "t5" else None
        )
        self.rope = RotaryEmbedding(config.d_kv, config.rope_theta) if pe == "rope" else None
        self.fire = (
            FIRE(config.num_heads, config.fire_hidden_size, config.fire_init_threshold)
            if pe == "fire"
            else None
        )
        if pe == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.num_heads), persistent=False)
        else:
            self.alibi_slopes = None
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = None  # gradient_checkpointing_enable's (kwargs applied)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask=None,
        segment_ids=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        encoder_segment_ids=None,
        cache=None,
    ) -> torch.Tensor:
        """x: (B, M, d_model) embeddings."""
        m = x.shape[1]
        q_offset = cache.offset if cache is not None else 0
        n_total = m + (q_offset if isinstance(q_offset, int) else 0)
        ctx = AttentionContext(
            key_padding_mask=None if attention_mask is None else attention_mask.bool(),
            segment_ids=segment_ids,
            q_offset=q_offset,
            rel_table=self.relative_attention_bias.weight
            if self.relative_attention_bias is not None
            else None,
            alibi_slopes=self.alibi_slopes,
            rope=self.rope,
            enc_key_padding_mask=None if encoder_attention_mask is None else encoder_attention_mask.bool(),
            enc_segment_ids=encoder_segment_ids,
        )
        if self.fire is not None:
            n_keys = cache.key_length(m) if cache is not None else n_total
            ctx.bias = self.fire(m, n_keys, q_offset, bidirectional=not self.is_decoder).to(x.dtype)
        x = self.dropout(x)
        out = None  # the last block's output, added to x by the next norm (Block.forward)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x, out = (self._gradient_checkpointing_func or _checkpoint)(
                    layer, x, ctx, encoder_hidden_states, None, i, out
                )
            else:
                x, out = layer(x, ctx, encoder_hidden_states, cache, i, out)
        if cache is not None:
            cache.advance(m)
        h = self.final_norm(x) if out is None else self.final_norm(out, x)[0]
        return self.dropout(h)


def _checkpoint(*args):
    return torch.utils.checkpoint.checkpoint(*args, use_reentrant=False)


class FAT5PreTrainedModel(PreTrainedModel):
    config_class = FAT5Config
    base_model_prefix = "fat5"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """HF T5's initialisation (Mesh TensorFlow's), so converted and fresh models start alike."""
        c, f = self.config, self.config.initializer_factor
        if isinstance(module, RMSNorm):
            init.constant_(module.weight, f)
        elif isinstance(module, Attention):
            init.normal_(module.q.weight, 0.0, f * (c.d_model * c.d_kv) ** -0.5)
            init.normal_(module.k.weight, 0.0, f * c.d_model**-0.5)
            init.normal_(module.v.weight, 0.0, f * c.d_model**-0.5)
            init.normal_(module.o.weight, 0.0, f * (c.num_heads * c.d_kv) ** -0.5)
        elif isinstance(module, FeedForward):
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(module, name):
                    init.normal_(getattr(module, name).weight, 0.0, f * c.d_model**-0.5)
            init.normal_(module.wo.weight, 0.0, f * c.d_ff**-0.5)
        elif isinstance(module, Stack):
            if module.relative_attention_bias is not None:
                init.normal_(module.relative_attention_bias.weight, 0.0, f * c.d_model**-0.5)
            if module.alibi_slopes is not None:
                # non-persistent buffers are not in checkpoints: from_pretrained leaves them uninitialised
                init.copy_(module.alibi_slopes, alibi_slopes(c.num_heads))
        elif isinstance(module, RotaryEmbedding):
            inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, c.d_kv, 2, dtype=torch.float32) / c.d_kv)
            init.copy_(module.inv_freq, inv_freq)
        elif isinstance(module, FIRE):
            for lin in (module.mlp[0], module.mlp[2]):
                init.kaiming_uniform_(lin.weight, a=5**0.5)
                init.zeros_(lin.bias)
            init.zeros_(module.log_c)
            init.constant_(module.threshold, c.fire_init_threshold)
        elif isinstance(module, nn.Linear) and getattr(module, "_fat5_head", False):
            init.normal_(module.weight, 0.0, f * c.d_model**-0.5)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, FAT5PreTrainedModel) and hasattr(module, "shared"):
            init.normal_(module.shared.weight, 0.0, f)
            if getattr(module, "lm_head", None) is not None and not c.tie_word_embeddings:
                init.normal_(module.lm_head.weight, 0.0, f)

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func=None, **kwargs
    ) -> None:
        # transformers >= 5 also passes every_n_layers; fat5 checkpoints every block
        for m in self.modules():
            if isinstance(m, Stack):
                m.gradient_checkpointing = enable
                m._gradient_checkpointing_func = gradient_checkpointing_func


def _embed(table: nn.Embedding, ids, embeds) -> torch.Tensor:
    if (ids is None) == (embeds is None):
        raise ValueError("give exactly one of input ids and input embeddings")
    if embeds is not None:
        return embeds
    return table(ids)


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    out = labels.new_full(labels.shape, start_id)
    out[..., 1:] = labels[..., :-1]
    return out.masked_fill(out == -100, pad_id)


class FAT5EncoderModel(FAT5PreTrainedModel):
    def __init__(self, config: FAT5Config):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, is_decoder=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, emb):
        self.shared = emb

    def forward(self, input_ids=None, attention_mask=None, segment_ids=None, inputs_embeds=None, **kwargs):
        h = self.encoder(_embed(self.shared, input_ids, inputs_embeds), attention_mask, segment_ids)
        return BaseModelOutput(last_hidden_state=h)


class FAT5ForConditionalGeneration(FAT5PreTrainedModel, GenerationMixin):
    def __init__(self, config: FAT5Config):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, is_decoder=False)
        self.decoder = Stack(config, is_decoder=True)
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )
        self.post_init()

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, emb):
        self.shared = emb

    def get_output_embeddings(self):
        return self.lm_head

    def get_encoder(self):
        return self.encoder

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """Greedy / sampling / beam search with a KV cache; Hugging Face keyword names (fat5.generation)."""
        from .generation import generate

        # Seq2SeqTrainer(predict_with_generate) passes the batch's labels and synced_gpus, as HF generate takes them
        kwargs.pop("labels", None)
        if kwargs.pop("synced_gpus", False):
            raise ValueError(
                "synced_gpus (DeepSpeed ZeRO-3 / FSDP generation) is not supported by fat5's generate"
            )
        return generate(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _output_weight(self) -> torch.Tensor:
        return self.shared.weight if self.lm_head is None else self.lm_head.weight

    def _decoder_output(self, h: torch.Tensor) -> torch.Tensor:
        # T5 v1.0 (tied embeddings) rescales before the shared projection
        return h * self.config.d_model**-0.5 if self.config.tie_word_embeddings else h

    def encode(
        self, input_ids=None, attention_mask=None, segment_ids=None, inputs_embeds=None
    ) -> torch.Tensor:
        return self.encoder(_embed(self.shared, input_ids, inputs_embeds), attention_mask, segment_ids)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        labels=None,
        segment_ids=None,
        decoder_segment_ids=None,
        encoder_outputs=None,
        past_key_values=None,
        inputs_embeds=None,
        decoder_inputs_embeds=None,
        return_logits: bool | None = None,
        use_cache=None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        if encoder_outputs is None:
            enc = self.encode(input_ids, attention_mask, segment_ids, inputs_embeds)
        else:
            enc = (
                encoder_outputs[0]
                if isinstance(encoder_outputs, (tuple, list))
                else encoder_outputs.last_hidden_state
            )
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if labels is None:
                raise ValueError("give decoder_input_ids (or labels, which are shifted right into them)")
            decoder_input_ids = shift_right(
                labels, self.config.decoder_start_token_id, self.config.pad_token_id
            )
        h = self.decoder(
            _embed(self.shared, decoder_input_ids, decoder_inputs_embeds),
            decoder_attention_mask,
            decoder_segment_ids,
            encoder_hidden_states=enc,
            encoder_attention_mask=attention_mask,
            encoder_segment_ids=segment_ids if decoder_segment_ids is not None else None,
            cache=past_key_values,
        )
        h = self._decoder_output(h)
        if return_logits is None:
            # training with labels: the fused loss never materialises fp32 logits
            return_logits = labels is None or not self.training
        logits = loss = None
        c = self.config
        if return_logits:
            logits = F.linear(h, self._output_weight())
        if labels is not None:
            flat_labels = labels.reshape(-1)
            if logits is not None:
                loss, _ = ops.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), flat_labels, -100, c.z_loss, c.label_smoothing
                )
            else:
                loss, _ = ops.linear_cross_entropy(
                    h.reshape(-1, h.shape[-1]),
                    self._output_weight(),
                    flat_labels,
                    -100,
                    c.z_loss,
                    c.label_smoothing,
                )
        return Seq2SeqLMOutput(
            loss=loss, logits=logits, past_key_values=past_key_values, encoder_last_hidden_state=enc
        )
