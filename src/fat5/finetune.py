"""``fat5 finetune``: sequence-to-sequence finetuning on input/target pairs, with exact match and ROUGE-L."""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from . import distributed as D
from .model import FAT5ForConditionalGeneration
from .runconfig import RunConfig
from .train import Trainer, _add_common, _autocast, _run_config, _seed_everything, prepare_out_dir


def add_finetune_command(subparsers) -> None:
    """Register ``fat5 finetune``."""
    f = subparsers.add_parser(
        "finetune",
        help="finetune a seq2seq model on input/target pairs",
        description="Seq2seq finetuning from a fat5 or transformers T5 folder. Reports validation loss, "
        "exact match and ROUGE-L (greedy generation), writes predictions to DIR/predictions.jsonl.",
    )
    _add_common(f, "runs/finetune")
    f.add_argument("--model", required=True, metavar="DIR", help="fat5 or transformers T5/mT5 folder")
    f.add_argument(
        "--train",
        required=True,
        metavar="DATA",
        help=".jsonl, .csv, a saved HF dataset folder, or hf:NAME[:CONFIG][@SPLIT]",
    )
    f.add_argument("--valid", metavar="DATA", help="validation data (same kinds)")
    f.add_argument("--input-field", help="field holding the input text (default: input)")
    f.add_argument("--target-field", help="field holding the target text (default: target)")
    f.set_defaults(func=run_finetune)


def read_pairs(source: str, input_field: str, target_field: str) -> list[tuple[str, str]]:
    """(input, target) text pairs from .jsonl, .csv, a saved HF dataset folder or ``hf:NAME[:CONFIG][@SPLIT]``."""
    rows: Iterable[dict]
    p = Path(source)
    if source.startswith("hf:") or (
        p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists())
    ):
        import datasets

        if source.startswith("hf:"):
            spec, _, split = source[3:].partition("@")
            name, _, conf = spec.partition(":")
            rows = datasets.load_dataset(name, conf or None, split=split or "train")
        else:
            rows = datasets.load_from_disk(str(p))
            if isinstance(rows, datasets.DatasetDict):
                rows = rows["train"]
    elif not p.exists():
        raise FileNotFoundError(f"finetuning data not found: {p}")
    elif p.suffix == ".jsonl":
        with open(p, encoding="utf-8") as fh:
            rows = []
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{p}:{i}: not valid JSON ({e})") from None
    elif p.suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    else:
        raise ValueError(
            f"{p}: unsupported finetuning data {p.suffix!r}; use .jsonl, .csv, a saved HF dataset "
            "folder or hf:NAME"
        )
    pairs = []
    for i, r in enumerate(rows):
        missing = [f for f in (input_field, target_field) if f not in r]
        if missing:
            raise ValueError(
                f"{source} row {i}: no field(s) {missing} (found {list(r)}); "
                "set --input-field / --target-field"
            )
        pairs.append((str(r[input_field]), str(r[target_field])))
    if not pairs:
        raise ValueError(f"{source} holds no examples")
    return pairs


class Seq2SeqBatches:
    """Batches of tokenised (input, target) pairs, padded to the longest in each batch.

    Endless (shuffled each epoch, seeded) for training, or one pass in order (``epochs=1``) for eval. Each
    step takes ``batch_size * world_size`` consecutive examples; rank r gets the r-th block of
    ``batch_size``, so one process with the whole global batch sees the same rows. An epoch is filled up to
    whole global batches with rows whose labels are all -100 (they weigh nothing in the loss).
    ``state_dict()`` (epoch, batch index) makes resumption exact.
    """

    def __init__(
        self,
        pairs: list[tuple[list[int], list[int]]],
        batch_size: int,
        pad_id: int,
        start_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
    ):
        self.pairs, self.batch_size, self.pad_id, self.start_id = pairs, batch_size, pad_id, start_id
        self.seed, self.rank, self.world_size, self.epochs = seed, rank, world_size, epochs
        self.epoch, self.index = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "num_pairs": len(self.pairs), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["num_pairs"] != len(self.pairs) or state["seed"] != self.seed:
            raise ValueError(
                "the finetuning data or seed changed since the checkpoint: resume with the same ones"
            )
        self.epoch, self.index = state["epoch"], state["index"]

    def _order(self, epoch: int) -> list[int]:
        n = len(self.pairs)
        if self.epochs is not None:  # evaluation: in order
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g).tolist()

    def __iter__(self) -> Iterator[dict]:
        per_step = self.batch_size * self.world_size
        while self.epochs is None or self.epoch < self.epochs:
            order = self._order(self.epoch)
            steps = -(-len(order) // per_step)
            while self.index < steps:
                block = order[self.index * per_step : (self.index + 1) * per_step]
                mine = block[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
                self.index += 1
                yield self._collate(mine)
            self.epoch, self.index = self.epoch + 1, 0

    def _collate(self, idx: list[int]) -> dict:
        rows = [self.pairs[i] for i in idx]
        dummies = self.batch_size - len(rows)
        rows += [(self.pairs[0][0], [])] * dummies  # filler rows: no labels
        le = max(len(a) for a, _ in rows)
        ld = max(1, max(len(b) for _, b in rows))
        b = len(rows)
        input_ids = torch.full((b, le), self.pad_id, dtype=torch.long)
        labels = torch.full((b, ld), -100, dtype=torch.long)
        for r, (a, tgt) in enumerate(rows):
            input_ids[r, : len(a)] = torch.tensor(a)
            labels[r, : len(tgt)] = torch.tensor(tgt, dtype=torch.long)
        attention_mask = (torch.arange(le)[None] < torch.tensor([len(a) for a, _ in rows])[:, None]).long()
        dec_in = torch.full_like(labels, self.pad_id)
        dec_in[:, 0] = self.start_id
        dec_in[:, 1:] = labels[:, :-1].clamp(min=0)
        dec_in[:, 1:][labels[:, :-1] == -100] = self.pad_id
        dec_mask = torch.zeros_like(labels)
        lengths = torch.tensor([len(t) for _, t in rows])
        dec_mask[torch.arange(ld)[None] < lengths.clamp(min=1)[:, None]] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "decoder_input_ids": dec_in,
            "decoder_attention_mask": dec_mask,
            "labels": labels,
        }


def tokenize_pairs(tok, pairs: list[tuple[str, str]], enc_len: int, dec_len: int, what: str):
    """Token ids (eos appended) cut to enc_len / dec_len, with a warning that counts the cuts."""
    a = tok([x for x, _ in pairs], add_special_tokens=True)["input_ids"]
    b = tok([y for _, y in pairs], add_special_tokens=True)["input_ids"]
    cut_a, cut_b = sum(len(x) > enc_len for x in a), sum(len(y) > dec_len for y in b)
    if cut_a or cut_b:
        warnings.warn(
            f"{what}: {cut_a} input(s) cut to train.enc_len={enc_len} and {cut_b} target(s) cut to "
            f"train.dec_len={dec_len} tokens",
            stacklevel=2,
        )
    return [(x[:enc_len], y[:dec_len]) for x, y in zip(a, b)]


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on whitespace tokens (longest common subsequence)."""
    p, r = prediction.split(), reference.split()
    if not p or not r:
        return float(p == r)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def _normalize(s: str) -> str:
    return " ".join(s.split())


def generation_eval_hook(tok, pairs: list[tuple[str, str]], cfg: RunConfig, out: Path):
    """Eval hook: greedy/beam generation on the validation inputs; exact match, ROUGE-L, predictions.jsonl.

    Every rank generates for all examples (FSDP needs every rank in each forward); rank 0 writes.
    """

    def hook(trainer: Trainer) -> dict[str, float]:
        t = cfg.train
        max_new = cfg.data.max_new_tokens or t.dec_len
        preds: list[str] = []
        for i in range(0, len(pairs), t.batch_size):
            chunk = [x for x, _ in pairs[i : i + t.batch_size]]
            enc = tok(chunk, padding=True, truncation=True, max_length=t.enc_len, return_tensors="pt")
            with _autocast(trainer.precision, trainer.device):
                ids = trainer.model.generate(
                    input_ids=enc["input_ids"].to(trainer.device),
                    attention_mask=enc["attention_mask"].to(trainer.device),
                    max_new_tokens=max_new,
                    num_beams=cfg.data.num_beams,
                )
            preds += tok.batch_decode(ids, skip_special_tokens=True)
        em = sum(_normalize(p) == _normalize(y) for p, (_, y) in zip(preds, pairs)) / len(pairs)
        rl = sum(rouge_l(p, y) for p, (_, y) in zip(preds, pairs)) / len(pairs)
        if trainer.dist.is_main:
            tmp = out / "predictions.jsonl.tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                for p, (x, y) in zip(preds, pairs):
                    fh.write(
                        json.dumps(
                            {
                                "step": trainer.step,
                                "input": x,
                                "target": y,
                                "prediction": p,
                                "exact_match": _normalize(p) == _normalize(y),
                            }
                        )
                        + "\n"
                    )
            os.replace(tmp, out / "predictions.jsonl")
        return {"exact_match": em, "rouge_l": rl}

    return hook


def load_model(path: str | os.PathLike, **overrides) -> FAT5ForConditionalGeneration:
    """A fat5 folder, or a transformers T5 / mT5 / FLAN-T5 folder (converted on the fly)."""
    p = Path(path)
    cfg_path = p / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{p} has no config.json: not a model folder")
    model_type = json.loads(cfg_path.read_text()).get("model_type")
    if model_type == "fat5":
        return FAT5ForConditionalGeneration.from_pretrained(str(p), dtype=torch.float32, **overrides)
    if model_type in ("t5", "mt5"):
        from .hf import load_hf_t5

        model = load_hf_t5(p)
        for k, v in overrides.items():
            setattr(model.config, k, v)
        return model
    raise ValueError(f"{p}: model_type {model_type!r} is neither fat5 nor a transformers t5/mt5 checkpoint")


FINETUNE_DEFAULTS = {
    "optim": {"lr": 1e-3},
    "schedule": {"name": "constant", "warmup_steps": 0},
    "train": {
        "max_steps": 1000,
        "batch_size": 16,
        "enc_len": 512,
        "dec_len": 128,
        "eval_every": 200,
        "ckpt_every": 200,
        "eval_at_start": True,
    },
}


def run_finetune(args) -> None:
    from .data.tokenizer import load_tokenizer

    cfg = _run_config(args, base=FINETUNE_DEFAULTS)
    cfg.model.path = args.model
    for name in ("train", "valid", "input_field", "target_field"):
        if getattr(args, name, None) is not None:
            setattr(cfg.data, name, getattr(args, name))
    out, t = Path(args.out), cfg.train
    dist = D.init_distributed(t.device)
    try:
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            prepare_out_dir(out, args.resume, args.overwrite)
        D.barrier()
        tok = load_tokenizer(args.model)
        model = load_model(args.model, **cfg.model.overrides)
        if len(tok) > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer in {args.model} has {len(tok)} tokens but the model's vocabulary "
                f"only {model.config.vocab_size}"
            )
        fields = (cfg.data.input_field, cfg.data.target_field)
        train_pairs = tokenize_pairs(tok, read_pairs(cfg.data.train, *fields), t.enc_len, t.dec_len, "train")
        pad, start = model.config.pad_token_id, model.config.decoder_start_token_id
        train = Seq2SeqBatches(train_pairs, t.batch_size, pad, start, t.seed, dist.rank, dist.world_size)
        val_fn = hook = None
        if cfg.data.valid:
            valid_text = read_pairs(cfg.data.valid, *fields)[: cfg.data.max_valid_examples]
            valid_ids = tokenize_pairs(tok, valid_text, t.enc_len, t.dec_len, "valid")

            def val_fn():
                return Seq2SeqBatches(
                    valid_ids, t.batch_size, pad, start, 0, dist.rank, dist.world_size, epochs=1
                )

            hook = generation_eval_hook(tok, valid_text, cfg, out)
        _seed_everything(t.seed)
        trainer = Trainer(
            cfg,
            model,
            train,
            out,
            val_fn,
            dist,
            eval_hook=hook,
            resume=args.resume,
            show_progress=not args.quiet,
        )
        if dist.is_main:
            n = sum(p.numel() for p in trainer.model.parameters())
            print(
                f"finetuning {args.model} ({n / 1e6:.2f}M parameters) on "
                f"{len(train_pairs)} examples, {dist.device} x{dist.world_size}, precision {trainer.precision}"
            )
        trainer.fit()
        if trainer.step >= t.max_steps:
            trainer.save_final(out / "final", tok)
            if dist.is_main:
                print(f"final model: {out / 'final'}")
    finally:
        D.shutdown()
