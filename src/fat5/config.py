"""Model configuration: a Hugging Face ``PretrainedConfig`` carrying every T5 field plus fat5's extras.

Extras over T5: ``position_encoding`` (t5 relative buckets, rope, alibi, fire, none), ``attention_scale``
(1.0 is the T5 convention: no 1/sqrt(d) scaling), ``z_loss`` and ``label_smoothing`` for the training loss,
``rope_theta`` and ``fire_*`` knobs. Named presets live in ``PRESETS``; ``FAT5Config.from_preset`` builds
one with overrides.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

POSITION_ENCODINGS = ("t5", "rope", "alibi", "fire", "none")
FEED_FORWARD_PROJ = ("relu", "gated-gelu", "gated-silu", "gated-relu", "gelu", "silu")


class FAT5Config(PretrainedConfig):
    model_type = "fat5"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_layers",
        "head_dim": "d_kv",
    }

    def __init__(
        self,
        vocab_size: int = 32128,
        d_model: int = 512,
        d_kv: int = 64,
        d_ff: int = 2048,
        num_layers: int = 6,
        num_decoder_layers: int | None = None,
        num_heads: int = 8,
        relative_attention_num_buckets: int = 32,
        relative_attention_max_distance: int = 128,
        dropout_rate: float = 0.0,
        layer_norm_epsilon: float = 1e-6,
        initializer_factor: float = 1.0,
        feed_forward_proj: str = "gated-gelu",
        is_encoder_decoder: bool = True,
        use_cache: bool = True,
        pad_token_id: int = 0,
        eos_token_id: int = 1,
        decoder_start_token_id: int = 0,
        tie_word_embeddings: bool = False,
        position_encoding: str = "t5",
        attention_scale: float = 1.0,
        z_loss: float = 0.0,
        label_smoothing: float = 0.0,
        rope_theta: float = 10000.0,
        fire_hidden_size: int = 32,
        fire_init_threshold: float = 512.0,
        classifier_dropout: float = 0.0,
        pooling: str = "mean",
        **kwargs: Any,
    ):
        if position_encoding not in POSITION_ENCODINGS:
            raise ValueError(
                f"unknown position_encoding {position_encoding!r}; valid choices: {', '.join(POSITION_ENCODINGS)}"
            )
        if feed_forward_proj not in FEED_FORWARD_PROJ:
            raise ValueError(
                f"unknown feed_forward_proj {feed_forward_proj!r}; valid choices: {', '.join(FEED_FORWARD_PROJ)}"
            )
        if (
            position_encoding == "t5"
            and relative_attention_max_distance <= relative_attention_num_buckets // 2
        ):
            raise ValueError(
                f"relative_attention_max_distance ({relative_attention_max_distance}) must exceed "
                f"relative_attention_num_buckets // 2 ({relative_attention_num_buckets // 2}), the exact range of "
                "the decoder's buckets; T5 uses 32 buckets and 128"
            )
        if pooling not in ("mean", "first", "eos"):
            raise ValueError(f"unknown pooling {pooling!r}; valid choices: mean, first, eos")
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.d_kv = d_kv
        self.d_ff = d_ff
        self.num_layers = num_layers
        self.num_decoder_layers = num_decoder_layers if num_decoder_layers is not None else num_layers
        self.num_heads = num_heads
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        self.dropout_rate = dropout_rate
        self.classifier_dropout = classifier_dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_factor = initializer_factor
        self.feed_forward_proj = feed_forward_proj
        self.use_cache = use_cache
        self.position_encoding = position_encoding
        self.attention_scale = attention_scale
        self.z_loss = z_loss
        self.label_smoothing = label_smoothing
        self.rope_theta = rope_theta
        self.fire_hidden_size = fire_hidden_size
        self.fire_init_threshold = fire_init_threshold
        self.pooling = pooling
        super().__init__(
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            decoder_start_token_id=decoder_start_token_id,
            is_encoder_decoder=is_encoder_decoder,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        return self.feed_forward_proj.removeprefix("gated-")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> FAT5Config:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        fields = {**PRESETS[name], **overrides}
        return cls(**fields)


# T5 v1.1 shapes (gated-gelu, untied embeddings, no dropout for pretraining as in nanoT5/UL2).
_V11 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=32128)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=4096,
        d_model=128,
        d_kv=32,
        d_ff=384,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
    ),
    "fat5-small": dict(
        vocab_size=32768,
        d_model=512,
        d_kv=64,
        d_ff=2048,
        num_layers=12,
        num_decoder_layers=12,
        num_heads=8,
        feed_forward_proj="gated-gelu",
    ),
    "small": dict(_V11, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6),
    "base": dict(_V11, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12),
    "large": dict(_V11, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16),
    "xl": dict(_V11, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32),
    "xxl": dict(_V11, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64),
}
