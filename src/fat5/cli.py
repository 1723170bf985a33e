"""The ``fat5`` command: pretrain | finetune | generate | convert | tokenizer | data.

Each feature module contributes its own sub-commands; this file only assembles them and dispatches.
"""

from __future__ import annotations

import argparse
import sys


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints between transformers T5/mT5 and fat5")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="SRC", help="a transformers T5/mT5/FLAN-T5 folder")
    direction.add_argument("--to-hf", metavar="SRC", help="a fat5 folder (T5 relative buckets only)")
    p.add_argument("--out", required=True, metavar="DST")
    p.set_defaults(func=_convert)


def _convert(args) -> None:
    from .hf import convert_from_hf, convert_to_hf

    if args.from_hf:
        model = convert_from_hf(args.from_hf, args.out)
        n = sum(p.numel() for p in model.parameters())
        print(f"converted {args.from_hf} -> {args.out} ({n / 1e6:.1f}M parameters)")
    else:
        convert_to_hf(args.to_hf, args.out)
        print(f"exported {args.to_hf} -> {args.out} (loads in transformers.T5ForConditionalGeneration)")


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="training-step throughput vs transformers T5 on this GPU", add_help=False
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: __import__("fat5.bench", fromlist=["main"]).main(args.rest))


def build_parser() -> argparse.ArgumentParser:
    from .data.commands import add_commands as add_data_commands
    from .generation import add_generate_command
    from .train import add_train_commands

    parser = argparse.ArgumentParser(prog="fat5", description="Flash Attention T5: pretrain, finetune, serve")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_commands(sub)
    add_generate_command(sub)
    _add_convert(sub)
    add_data_commands(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"fat5 {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
