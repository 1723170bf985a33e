"""The Hugging Face boundary: T5 / mT5 / FLAN-T5 checkpoints in and out.

``convert_from_hf(src, dst)`` reads a ``transformers`` T5 or mT5 folder (config.json plus single-file or
sharded safetensors, or pytorch_model.bin read with ``weights_only=True``) and writes a fat5 folder;
``convert_to_hf(src, dst)`` writes a folder that plain ``transformers.T5ForConditionalGeneration`` loads.
Only configurations that T5 itself can express export: T5 relative buckets and attention scale 1.0.

T5 quirks kept: v1.0 ties the embeddings and rescales the decoder output by d_model**-0.5 (fat5 models it as
``tie_word_embeddings=True``); transformers >= 5 records that rescaling as ``scale_decoder_outputs`` and
always ties ``lm_head`` to ``shared`` unless a checkpoint holds a different ``lm_head.weight``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import FAT5Config
from .model import FAT5ForConditionalGeneration

HF_T5_TYPES = ("t5", "mt5")

# (fat5 name, transformers name) templates; {s}: stack, {i}: layer, {p}: projection.
# Encoder blocks: HF sub-layer 0 = self-attention, 1 = feed-forward. Decoder: 0 self, 1 cross, 2 feed-forward.
_RULES = [
    ("shared.weight", "shared.weight"),
    ("lm_head.weight", "lm_head.weight"),
    (
        "{s}.relative_attention_bias.weight",
        "{s}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    ("{s}.final_norm.weight", "{s}.final_layer_norm.weight"),
    ("{s}.layers.{i}.attn_norm.weight", "{s}.block.{i}.layer.0.layer_norm.weight"),
    ("{s}.layers.{i}.attn.{p}.weight", "{s}.block.{i}.layer.0.SelfAttention.{p}.weight"),
    ("decoder.layers.{i}.cross_norm.weight", "decoder.block.{i}.layer.1.layer_norm.weight"),
    ("decoder.layers.{i}.cross_attn.{p}.weight", "decoder.block.{i}.layer.1.EncDecAttention.{p}.weight"),
    ("encoder.layers.{i}.ff_norm.weight", "encoder.block.{i}.layer.1.layer_norm.weight"),
    ("decoder.layers.{i}.ff_norm.weight", "decoder.block.{i}.layer.2.layer_norm.weight"),
    ("encoder.layers.{i}.ff.{f}.weight", "encoder.block.{i}.layer.1.DenseReluDense.{f}.weight"),
    ("decoder.layers.{i}.ff.{f}.weight", "decoder.block.{i}.layer.2.DenseReluDense.{f}.weight"),
]
_GROUPS = {"s": "encoder|decoder", "i": r"\d+", "p": "[qkvo]", "f": "wi_0|wi_1|wi|wo"}


def _to_regex(template: str) -> re.Pattern:
    out = re.escape(template)
    for name, pat in _GROUPS.items():
        out = out.replace(re.escape("{" + name + "}"), f"(?P<{name}>{pat})")
    return re.compile(out + "$")


_FWD = [(_to_regex(a), b) for a, b in _RULES]
_BWD = [(_to_regex(b), a) for a, b in _RULES]


def _rename(name: str, rules) -> str | None:
    for pat, template in rules:
        m = pat.match(name)
        if m:
            return template.format(**m.groupdict())
    return None


def fat5_to_hf_name(name: str) -> str | None:
    return _rename(name, _FWD)


def hf_to_fat5_name(name: str) -> str | None:
    return _rename(name, _BWD)


# ---------------------------------------------------------------- reading checkpoints


def read_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a transformers-style folder: safetensors (single or sharded) or pytorch_model.bin."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    for index_name, loader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", _load_bin),
    ):
        index = folder / index_name
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for f in files:
                sd.update(loader(str(folder / f)))
            return sd
    if (folder / "model.safetensors").exists():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").exists():
        return _load_bin(str(folder / "pytorch_model.bin"))
    raise FileNotFoundError(
        f"no weights in {folder}: expected model.safetensors, a sharded model.safetensors.index.json, "
        "or pytorch_model.bin"
    )


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    # weights_only: a pickle from an untrusted folder must not run code
    return torch.load(path, map_location="cpu", weights_only=True)


def _config_from_hf(hf: dict) -> FAT5Config:
    # mT5 never rescales (and is untied); T5 v1.0 does; transformers >= 5 writes scale_decoder_outputs
    if hf.get("model_type") == "mt5":
        scale = False
    else:
        scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    keys = (
        "vocab_size d_model d_kv d_ff num_layers num_decoder_layers num_heads relative_attention_num_buckets "
        "relative_attention_max_distance dropout_rate layer_norm_epsilon initializer_factor feed_forward_proj "
        "pad_token_id eos_token_id decoder_start_token_id"
    ).split()
    fields = {k: hf[k] for k in keys if k in hf}
    return FAT5Config(**fields, tie_word_embeddings=bool(scale), position_encoding="t5", attention_scale=1.0)


def _describe(names, limit=8) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_hf_t5(src: str | os.PathLike, dtype: torch.dtype | None = None) -> FAT5ForConditionalGeneration:
    """A fat5 model holding the weights of a transformers T5 / mT5 / FLAN-T5 checkpoint folder."""
    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{src} has no config.json: not a transformers checkpoint folder")
    hf_cfg = json.loads(cfg_path.read_text())
    sd = read_state_dict(src)
    model_type = hf_cfg.get("model_type")
    mapped, unexpected = {}, []
    for name, t in sd.items():
        if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            continue  # copies of shared.weight
        if name == "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight":
            continue  # never used by T5 (HF ignores it too)
        new = hf_to_fat5_name(name)
        if new is None:
            unexpected.append(name)
        else:
            mapped[new] = t
    if model_type not in HF_T5_TYPES or unexpected:
        required = {"shared.weight", "encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"}
        missing = required - set(sd)
        raise ValueError(
            f"{src} is not a T5/mT5 checkpoint (model_type={model_type!r}). Unexpected weights: "
            f"{_describe(unexpected) or 'none'}. Missing weights: {_describe(missing) or 'none'}. "
            "fat5 converts transformers T5, mT5 and FLAN-T5 folders."
        )
    config = _config_from_hf(hf_cfg)
    if "lm_head.weight" not in mapped and not config.tie_word_embeddings:
        mapped["lm_head.weight"] = mapped["shared.weight"].clone()  # transformers >= 5 saves it tied
    model = FAT5ForConditionalGeneration(config)
    load_checked(model, mapped, str(src))
    return model.to(dtype) if dtype is not None else model


def load_checked(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict that reports missing/unexpected names and shape mismatches instead of broadcasting."""
    own = model.state_dict()
    missing = set(own) - set(sd)
    unexpected = set(sd) - set(own)
    if missing or unexpected:
        raise ValueError(
            f"weights of {where} do not fit the model. Missing: {_describe(missing) or 'none'}. "
            f"Unexpected: {_describe(unexpected) or 'none'}."
        )
    bad = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if sd[k].shape != own[k].shape
    ]
    if bad:
        hint = ""
        if any(k in ("shared.weight", "lm_head.weight") for k in own if sd[k].shape != own[k].shape):
            hint = " (the config's vocab_size does not match the embedding in the weights)"
        raise ValueError(f"shape mismatch in {where}{hint}: " + "; ".join(bad[:8]))
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------- writing


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def hf_state_dict(model: FAT5ForConditionalGeneration) -> dict[str, torch.Tensor]:
    c = model.config
    if c.position_encoding != "t5" or c.attention_scale != 1.0:
        raise ValueError(
            f"only T5 relative buckets with attention_scale 1.0 export to transformers T5; this model has "
            f"position_encoding={c.position_encoding!r}, attention_scale={c.attention_scale}. "
            "Keep it as a fat5 folder (loadable with fat5 installed)."
        )
    out = {}
    for name, t in model.state_dict().items():
        hf_name = fat5_to_hf_name(name)
        if hf_name is None:
            raise ValueError(f"no transformers T5 name for weight {name!r}")
        out[hf_name] = t.detach().cpu()
    return out


def hf_config_dict(config: FAT5Config) -> dict:
    c = config
    return dict(
        architectures=["T5ForConditionalGeneration"],
        model_type="t5",
        vocab_size=c.vocab_size,
        d_model=c.d_model,
        d_kv=c.d_kv,
        d_ff=c.d_ff,
        num_layers=c.num_layers,
        num_decoder_layers=c.num_decoder_layers,
        num_heads=c.num_heads,
        relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance,
        dropout_rate=c.dropout_rate,
        layer_norm_epsilon=c.layer_norm_epsilon,
        initializer_factor=c.initializer_factor,
        feed_forward_proj=c.feed_forward_proj,
        is_encoder_decoder=True,
        tie_word_embeddings=c.tie_word_embeddings,
        scale_decoder_outputs=c.tie_word_embeddings,
        pad_token_id=c.pad_token_id,
        eos_token_id=c.eos_token_id,
        decoder_start_token_id=c.decoder_start_token_id,
        use_cache=True,
    )


def save_hf_t5(model: FAT5ForConditionalGeneration, dst: str | os.PathLike) -> None:
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    _atomic_save_file(hf_state_dict(model), dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(hf_config_dict(model.config), indent=2))


def convert_from_hf(src: str | os.PathLike, dst: str | os.PathLike) -> FAT5ForConditionalGeneration:
    model = load_hf_t5(src)
    model.save_pretrained(dst)
    _copy_tokenizer(Path(src), Path(dst))
    return model


def convert_to_hf(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    model = FAT5ForConditionalGeneration.from_pretrained(src)
    save_hf_t5(model, dst)
    _copy_tokenizer(Path(src), Path(dst))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())
