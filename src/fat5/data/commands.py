"""Command-line entry points of the data pipeline: ``fat5 tokenizer train`` and ``fat5 data prepare``.

``add_commands(subparsers)`` registers both on the main CLI's argparse subparsers; each leaf parser sets
``func``, which the main CLI calls with the parsed arguments.
"""

from __future__ import annotations

import argparse
import json
import os


def add_commands(subparsers) -> None:
    """Add ``tokenizer train`` and ``data prepare`` to an argparse ``subparsers`` object."""
    tok = subparsers.add_parser("tokenizer", help="train a tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    train = tok_sub.add_parser("train", help="train a unigram or byte-fallback BPE tokenizer")
    train.add_argument("--corpus", default="builtin", help="builtin | file or folder | hf:NAME[:CONFIG]")
    train.add_argument("--vocab-size", type=int, default=32000, help="learned pieces (before extras)")
    train.add_argument("--out", required=True, help="output folder (a transformers tokenizer folder)")
    train.add_argument("--kind", choices=("unigram", "bpe"), default="unigram")
    train.add_argument("--num-sentinels", type=int, default=100)
    train.add_argument("--text-field", default="text", help="text field of .jsonl / .parquet / HF rows")
    train.add_argument("--max-docs", type=int, default=None, help="train on at most this many documents")
    train.set_defaults(func=_train_tokenizer)

    data = subparsers.add_parser("data", help="prepare pretokenized data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="tokenize a corpus into memory-mapped shards (resumable)")
    prep.add_argument("--source", default="builtin", help="builtin | file or folder | hf:NAME[:CONFIG]")
    prep.add_argument("--tokenizer", required=True, help="tokenizer folder")
    prep.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    prep.add_argument("--val-fraction", type=float, default=0.01)
    prep.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes")
    prep.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard")
    prep.add_argument("--text-field", default="text")
    prep.add_argument("--streaming", action="store_true", help="stream a hf: dataset instead of downloading")
    prep.set_defaults(func=_prepare)


def _train_tokenizer(args: argparse.Namespace) -> None:
    from .corpus import TextSource
    from .tokenizer import train_tokenizer

    texts = TextSource(args.corpus, text_field=args.text_field, max_docs=args.max_docs)
    tok = train_tokenizer(texts, args.vocab_size, args.out, num_sentinels=args.num_sentinels, kind=args.kind)
    print(f"saved a {args.kind} tokenizer of {len(tok)} tokens to {args.out}")


def _prepare(args: argparse.Namespace) -> None:
    from .corpus import prepare

    man = prepare(
        args.source,
        args.tokenizer,
        args.out,
        val_fraction=args.val_fraction,
        num_workers=args.workers,
        shard_tokens=args.shard_tokens,
        text_field=args.text_field,
        streaming=args.streaming,
    )
    print(json.dumps(man["stats"], indent=1))
