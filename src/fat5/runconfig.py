"""The run configuration: typed dataclasses, read from YAML, with dotted command-line overrides.

A run config has five sections::

    model:    preset: tiny        # a name from fat5.config.PRESETS
              d_model: 256        # any other key overrides that FAT5Config field
    data:     corpus, tokenizer, subset size, UL2 mixture (pretraining); files and fields (finetuning)
    optim:    name, lr, betas, eps, weight_decay, grad_clip
    schedule: name, warmup_steps, min_lr_ratio, decay_fraction
    train:    max_steps, batch_size, grad_accum, enc_len, dec_len, eval_every, ckpt_every, log_every,
              compile, precision, max_bad_steps, seed, device, ...

``load_run_config(path, overrides)`` reads the YAML file (if any) and applies overrides such as
``train.max_steps=300 optim.lr=1e-3 model.d_model=256``; values are parsed with ``yaml.safe_load`` (so
``1e-3`` is a float, ``[0.9, 0.99]`` a list, ``null`` None). An unknown section or key is an error that
lists the valid ones. ``save_run_config`` writes the resolved config (every default spelled out) as YAML,
which is what a run stores next to its checkpoints.

``train.batch_size`` is the micro-batch of one process; one optimizer step sees
``batch_size * grad_accum * world_size`` sequences.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import PRESETS, FAT5Config

PRECISIONS = ("fp32", "bf16-autocast", "bf16-kahan", "bf16")
PARALLEL = ("ddp", "fsdp")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class ModelSection:
    preset: str = "tiny"
    path: str | None = None  # finetuning: the folder the model starts from (fat5 or transformers T5)
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    corpus: str | None = None  # None: the built-in corpus (Python's standard library sources)
    tokenizer: str | None = None  # None: train one on the corpus into OUT/tokenizer
    tokenizer_kind: str = "bpe"  # bpe trains in seconds; unigram (T5's kind) takes minutes on a few MB
    tokenizer_vocab: int | None = None  # learned pieces; None: fits the model's vocab_size
    tokenizer_docs: int | None = 200  # documents used to train the tokenizer (None: all)
    max_docs: int | None = 400  # documents of the corpus used (None: all); 400 built-in ones are ~6 MB
    prepared: str | None = None  # a folder written by `fat5 data prepare` (skips tokenising the corpus)
    val_fraction: float = 0.02
    mixture: str = "ul2"
    num_workers: int | None = None
    eval_batches: int = 4
    # finetuning
    train: str | None = None
    valid: str | None = None
    input_field: str = "input"
    target_field: str = "target"
    max_valid_examples: int | None = 200
    max_new_tokens: int | None = None  # generation length for eval; None: dec_len
    num_beams: int = 1


@dataclass
class OptimSection:
    name: str = "adamwscale"
    lr: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0


@dataclass
class ScheduleSection:
    name: str = "cosine"
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2


@dataclass
class TrainSection:
    max_steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    enc_len: int = 128
    dec_len: int = 64
    eval_every: int = 50
    eval_at_start: bool = False  # also evaluate before the first step (a finetuning baseline)
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    compile: bool = False
    # torch.compile mode: default, reduce-overhead (CUDA graphs: no kernel launch overhead; for fixed shapes, as
    # in pretraining, since each new shape records a new graph; measured on one GPU, not yet under torchrun),
    # max-autotune or max-autotune-no-cudagraphs
    compile_mode: str = "default"
    precision: str = "auto"  # auto: bf16-autocast on a bf16-capable GPU, else fp32
    max_bad_steps: int = 5
    seed: int = 0
    device: str = "auto"  # auto: cuda (this process's local rank) when available, else cpu
    parallel: str = "ddp"  # ddp or fsdp (FSDP2 fully_shard per block) under torchrun
    peak_tflops: float | None = None  # for MFU; None: a per-device default (none on CPU)


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)

    def model_config(self, **extra: Any) -> FAT5Config:
        return FAT5Config.from_preset(self.model.preset, **{**self.model.overrides, **extra})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = {"preset": self.model.preset, "path": self.model.path, **self.model.overrides}
        return d

    def validate(self) -> None:
        t = self.train
        if self.model.preset not in PRESETS:
            raise ValueError(
                f"unknown model.preset {self.model.preset!r}; valid presets: {', '.join(PRESETS)}"
            )
        if t.precision not in PRECISIONS + ("auto",):
            raise ValueError(
                f"unknown train.precision {t.precision!r}; valid choices: auto, {', '.join(PRECISIONS)}"
            )
        if t.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"unknown train.compile_mode {t.compile_mode!r}; valid choices: {', '.join(COMPILE_MODES)}"
            )
        if t.compile_mode != "default" and not t.compile:
            raise ValueError(
                f"train.compile_mode={t.compile_mode} takes effect only with train.compile=true; set both"
            )
        if t.parallel not in PARALLEL:
            raise ValueError(f"unknown train.parallel {t.parallel!r}; valid choices: {', '.join(PARALLEL)}")
        for name in (
            "max_steps",
            "batch_size",
            "grad_accum",
            "enc_len",
            "dec_len",
            "eval_every",
            "ckpt_every",
            "log_every",
            "max_bad_steps",
            "keep_checkpoints",
        ):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if len(self.optim.betas) != 2:
            raise ValueError(f"optim.betas must be two numbers, got {self.optim.betas}")


_SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def _model_fields() -> list[str]:
    names = set(inspect.signature(FAT5Config.__init__).parameters) - {"self", "kwargs"}
    for preset in PRESETS.values():
        names |= set(preset)
    return sorted(names)


def _coerce(section: str, key: str, value: Any, current: Any, annotation: str) -> Any:
    where = f"{section}.{key}"
    if value is None:
        if "None" not in annotation:
            raise ValueError(f"{where} cannot be null")
        return None
    if annotation.startswith("bool") and not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if annotation.startswith("int") and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if annotation.startswith("float"):
        if isinstance(value, str):  # yaml reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation.startswith("list"):
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return [float(v) for v in value]
    if annotation.startswith("str") and not isinstance(value, str):
        value = str(value)
    return value


def _set(cfg: RunConfig, dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    if section not in _SECTIONS:
        raise ValueError(
            f"unknown config section {section!r} in {dotted!r}; valid sections: {', '.join(_SECTIONS)}"
        )
    if not key:
        raise ValueError(f"{dotted!r} names a section, not a key: write {section}.KEY=VALUE")
    obj = getattr(cfg, section)
    if section == "model":
        if key in ("preset", "path"):
            setattr(obj, key, None if value is None else str(value))
            return
        valid = _model_fields()
        if key not in valid:
            raise ValueError(f"unknown model key {key!r}; valid keys: preset, path, {', '.join(valid)}")
        obj.overrides[key] = value
        return
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if key not in fields:
        raise ValueError(f"unknown key {dotted!r}; valid keys of {section}: {', '.join(fields)}")
    setattr(obj, key, _coerce(section, key, value, getattr(obj, key), str(fields[key].type)))


def _flatten(d: dict) -> list[tuple[str, Any]]:
    out = []
    for section, body in d.items():
        if not isinstance(body, dict):
            raise ValueError(
                f"config section {section!r} must be a mapping of keys, got {body!r}; "
                f"valid sections: {', '.join(_SECTIONS)}"
            )
        for key, value in body.items():
            if section == "model" and key == "overrides" and isinstance(value, dict):
                out += [(f"model.{k}", v) for k, v in value.items()]
            else:
                out.append((f"{section}.{key}", value))
    return out


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"expected KEY=VALUE (e.g. train.max_steps=300), got {item!r}")
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return out


def load_run_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
) -> RunConfig:
    """Defaults, then ``base`` (a nested dict), then the YAML file, then ``KEY=VALUE`` overrides."""
    cfg = RunConfig()
    for source in (base or {}), _read_yaml(path):
        for key, value in _flatten(source):
            _set(cfg, key, value)
    for key, value in parse_overrides(overrides or []):
        _set(cfg, key, value)
    cfg.validate()
    return cfg


def _read_yaml(path) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"run config not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a run config must be a mapping of sections, got {type(data).__name__}")
    return data


def save_run_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, p)


# transformers bookkeeping that says nothing about the architecture
_IGNORED_MODEL_KEYS = {
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
    "_name_or_path",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}


def model_config_diff(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ between two ``FAT5Config.to_dict()``s: {name: (saved, current)}."""
    keys = (set(saved) | set(current)) - _IGNORED_MODEL_KEYS
    return {k: (saved.get(k), current.get(k)) for k in sorted(keys) if saved.get(k) != current.get(k)}
