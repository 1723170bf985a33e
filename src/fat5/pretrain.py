"""``fat5 pretrain``: UL2 pretraining on a corpus (tokenizer training and pretokenization included)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from . import distributed as D
from .model import FAT5ForConditionalGeneration
from .runconfig import RunConfig
from .train import Trainer, _add_common, _run_config, _seed_everything, prepare_out_dir


def add_pretrain_command(subparsers) -> None:
    """Register ``fat5 pretrain``."""
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain a model with the UL2 mixture of denoisers",
        description="UL2 pretraining on a corpus (default: the Python standard library's sources). Trains a "
        "tokenizer when none is given, tokenises the corpus into DIR/data, trains, and writes "
        "checkpoints, logs, loss.png and the final model (DIR/final). Multi-GPU: torchrun "
        "--nproc_per_node N -m fat5 pretrain ...",
    )
    _add_common(p, "runs/pretrain")
    p.add_argument("--preset", help="model preset (tiny, small, base, ...); same as model.preset=NAME")
    p.add_argument(
        "--corpus", metavar="SRC", help="text source: file/folder (.txt/.jsonl/.parquet), hf:NAME, or builtin"
    )
    p.add_argument(
        "--tokenizer", metavar="DIR", help="tokenizer folder (default: train one into DIR/tokenizer)"
    )
    p.set_defaults(func=run_pretrain)


def _pretrain_tokenizer(cfg: RunConfig, out: Path, dist: D.DistInfo):
    from .data.corpus import TextSource
    from .data.tokenizer import load_tokenizer, train_tokenizer

    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    folder = out / "tokenizer"
    if dist.is_main and not (folder / "tokenizer.json").exists():
        vocab = cfg.data.tokenizer_vocab or cfg.model_config().vocab_size - 256
        print(
            f"training a {cfg.data.tokenizer_kind} tokenizer ({vocab} pieces) on "
            f"{cfg.data.tokenizer_docs or 'all'} documents of {cfg.data.corpus or 'builtin'} -> {folder}"
        )
        tmp = out / ".tmp-tokenizer"
        shutil.rmtree(tmp, ignore_errors=True)
        train_tokenizer(
            TextSource(cfg.data.corpus or "builtin", max_docs=cfg.data.tokenizer_docs),
            vocab,
            tmp,
            kind=cfg.data.tokenizer_kind,
        )
        os.rename(tmp, folder)
    D.barrier()
    return load_tokenizer(folder)


def _pretrain_data(cfg: RunConfig, out: Path, tok, dist: D.DistInfo) -> Path:
    import hashlib

    from .data.corpus import prepare
    from .data.tokenizer import tokenizer_hash

    if cfg.data.prepared:
        return Path(cfg.data.prepared)
    key = json.dumps(
        [cfg.data.corpus or "builtin", cfg.data.max_docs, cfg.data.val_fraction, tokenizer_hash(tok)]
    )
    folder = out / "data" / hashlib.sha256(key.encode()).hexdigest()[:12]
    if dist.is_main:
        prepare(
            cfg.data.corpus or "builtin",
            tok,
            folder,
            val_fraction=cfg.data.val_fraction,
            num_workers=cfg.data.num_workers,
            max_docs=cfg.data.max_docs,
        )
    D.barrier()
    return folder


def _mixture(name: str):
    from .data.ul2 import Mixture

    if name == "ul2":
        return Mixture.ul2()
    if name == "t5":
        return Mixture.t5()
    raise ValueError(f"unknown data.mixture {name!r}; valid choices: ul2, t5")


def run_pretrain(args) -> None:
    from itertools import islice

    from .data.corpus import TokenDataset
    from .data.packing import UL2Batches

    cfg = _run_config(args)
    if args.corpus:
        cfg.data.corpus = args.corpus
    if args.tokenizer:
        cfg.data.tokenizer = args.tokenizer
    out, t = Path(args.out), cfg.train
    dist = D.init_distributed(t.device)
    try:
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            prepare_out_dir(out, args.resume, args.overwrite)
        D.barrier()
        tok = _pretrain_tokenizer(cfg, out, dist)
        data_dir = _pretrain_data(cfg, out, tok, dist)
        model_cfg = cfg.model_config()
        train_ds = TokenDataset(data_dir, "train")
        train_ds.check_vocab(model_cfg.vocab_size)
        mixture = _mixture(cfg.data.mixture)
        train = UL2Batches(
            train_ds, tok, mixture, t.enc_len, t.dec_len, t.batch_size, t.seed, dist.rank, dist.world_size
        )
        val_fn = None
        try:
            val_ds = TokenDataset(data_dir, "val")
        except ValueError as e:
            warnings.warn(f"no validation loss: {e}", stacklevel=1)
        else:

            def val_fn():
                val = UL2Batches(
                    val_ds,
                    tok,
                    mixture,
                    t.enc_len,
                    t.dec_len,
                    t.batch_size,
                    t.seed + 1,
                    dist.rank,
                    dist.world_size,
                )
                return islice(iter(val), cfg.data.eval_batches)

        _seed_everything(t.seed)
        model = FAT5ForConditionalGeneration(model_cfg)
        trainer = Trainer(
            cfg, model, train, out, val_fn, dist, resume=args.resume, show_progress=not args.quiet
        )
        if dist.is_main:
            n = sum(p.numel() for p in model.parameters())
            print(
                f"model {cfg.model.preset}: {n / 1e6:.2f}M parameters on {dist.device} x{dist.world_size}, "
                f"precision {trainer.precision}; {len(train_ds)} training documents "
                f"({train_ds.num_tokens / 1e6:.1f}M tokens); global batch "
                f"{t.batch_size * t.grad_accum * dist.world_size} x ({t.enc_len} -> {t.dec_len}) tokens"
            )
        trainer.fit()
        if trainer.step >= t.max_steps:
            trainer.save_final(out / "final", tok)
            if dist.is_main:
                print(
                    f"final model: {out / 'final'}  (try: fat5 generate --model {out / 'final'} --demo); "
                    f"loss plot: {out / 'loss.png'}"
                )
    finally:
        D.shutdown()


# ------------------------------------------------------------------------------------------ finetune
