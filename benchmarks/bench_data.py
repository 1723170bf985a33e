"""Data-pipeline benchmark (CPU): UL2 collator throughput, pretokenisation speed, packing padding.

Questions answered, on the built-in corpus (the Python standard library's modules):
  1. collator tokens/s on one core (UL2Batches: denoise + pack + tensors), target >= 1M/s;
  2. pretokenisation MB/s per core (`prepare` with one worker process);
  3. padding fraction of the default UL2 mixture at 512/512 and 1024/1024 (encoder and decoder) with the
     default pieces (max_piece_fraction=0.5) and full-length ones (1.0), plus the balanced shapes
     512/256 and 1024/512, and the mixture's decoder/encoder token ratio rho, which sets the decoder's
     padding floor 1 - rho * enc_len / dec_len.
Writes benchmarks/results/data-<date>.md and .json. Usage: python benchmarks/bench_data.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core for everything below

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from fat5.data import Mixture, TokenDataset, UL2Batches, builtin_corpus, prepare, train_tokenizer  # noqa: E402

torch.set_num_threads(1)
RESULTS = Path(__file__).parent / "results"


def collate_speed(ds, tok, enc, dec, batch, n_batches, frac=0.5):
    it = UL2Batches(ds, tok, Mixture.ul2(), enc, dec, batch, seed=0, max_piece_fraction=frac)
    gen = iter(it)
    for _ in range(5):  # warm-up
        next(gen)
    it.reset_stats()
    t = time.perf_counter()
    for _ in range(n_batches):
        next(gen)
    dt = time.perf_counter() - t
    enc_pad, dec_pad = it.padding()
    return {
        "enc_len": enc,
        "dec_len": dec,
        "batch_size": batch,
        "max_piece_fraction": frac,
        "batches": n_batches,
        "raw_tokens_per_s": it.stats["raw_tokens"] / dt,
        "input_tokens_per_s": it.stats["enc_tokens"] / dt,
        "enc_padding": enc_pad,
        "dec_padding": dec_pad,
        "examples_per_row": sum(it.stats["examples"]) / (n_batches * batch),
        "dec_enc_token_ratio": it.stats["dec_tokens"] / it.stats["enc_tokens"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer batches (a smoke run)")
    ap.add_argument("--vocab-size", type=int, default=4000)
    args = ap.parse_args()
    n_batches = 20 if args.quick else 200
    out = {"date": datetime.date.today().isoformat()}
    with tempfile.TemporaryDirectory() as tmp:
        texts = list(builtin_corpus())
        t = time.perf_counter()
        tok = train_tokenizer(texts[:60], args.vocab_size, Path(tmp) / "tok", kind="unigram")
        out["tokenizer"] = {"kind": "unigram", "size": len(tok), "train_s": time.perf_counter() - t}
        t = time.perf_counter()
        man = prepare(builtin_corpus(), tok, Path(tmp) / "data", val_fraction=0.01, num_workers=1)
        dt = time.perf_counter() - t
        st = man["stats"]
        out["pretokenize"] = {
            "docs": st["docs"],
            "text_MB": st["text_bytes"] / 1e6,
            "tokens": st["train_tokens"] + st["val_tokens"],
            "seconds": dt,
            "MB_per_s_per_core": st["text_bytes"] / 1e6 / dt,
        }
        ds = TokenDataset(Path(tmp) / "data")
        runs = [
            (512, 512, 32, 0.5),
            (1024, 1024, 16, 0.5),
            (512, 512, 32, 1.0),
            (1024, 1024, 16, 1.0),
            (512, 256, 32, 0.5),
            (1024, 512, 16, 0.5),
            (512, 256, 32, 1.0),
        ]
        out["collator"] = [collate_speed(ds, tok, e, d, b, n_batches, f) for e, d, b, f in runs]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = "?"
    out["env"] = {
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
        "commit": commit,
        "cores_used": 1,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"data-{out['date']}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1))
    stem.with_suffix(".md").write_text(report(out))
    print(report(out))


def report(o) -> str:
    p = o["pretokenize"]
    lines = [
        f"# Data pipeline benchmark — {o['date']}",
        "",
        f"Environment: {json.dumps(o['env'])}",
        "",
        f"Corpus: built-in (Python {o['env']['python']} stdlib), {p['docs']} documents, {p['text_MB']:.1f} MB, "
        f"{p['tokens']:,} tokens with a {o['tokenizer']['size']}-token unigram tokenizer.",
        "",
        f"**Pretokenisation (one worker process, one core): {p['MB_per_s_per_core']:.2f} MB/s** "
        f"({p['seconds']:.1f} s).",
        "",
        "**UL2 collator, default mixture, one core** (raw = document tokens consumed; input = non-padding "
        "encoder tokens produced):",
        "",
        "| enc/dec | batch | max_piece_fraction | raw tok/s | input tok/s | enc padding | dec padding | "
        "dec/enc tokens (rho) | dec padding floor | examples/row |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in o["collator"]:
        lines.append(
            f"| {r['enc_len']}/{r['dec_len']} | {r['batch_size']} | {r['max_piece_fraction']} | "
            f"{r['raw_tokens_per_s'] / 1e6:.2f}M | {r['input_tokens_per_s'] / 1e6:.2f}M | "
            f"{r['enc_padding']:.2%} | {r['dec_padding']:.2%} | {r['dec_enc_token_ratio']:.3f} | "
            f"{max(0.0, 1 - r['dec_enc_token_ratio'] * r['enc_len'] / r['dec_len']):.2%} | "
            f"{r['examples_per_row']:.2f} |"
        )
    lines += [
        "",
        "Command: `.venv/bin/python benchmarks/bench_data.py` (one core via sched_setaffinity, "
        "torch.set_num_threads(1); 5 warm-up batches, then 200 timed). max_piece_fraction=0.5 is the "
        "default of `UL2Batches`.",
        "",
        "Reading: with full-length pieces (fraction 1.0) a maximal piece fills one side of its row and "
        "strands the other side's room (~5% encoder padding); with pieces of at most half the longest "
        "(0.5, the default) input-heavy and target-heavy pieces pair up and encoder padding stays well "
        "under 2%.",
        "",
        "Decoder padding is set by the mixture, not by packing. Nothing is dropped and the carried-over "
        "buffer stays a few dozen examples, so over the stream decoder tokens / encoder tokens equals the "
        "mixture's target/input token ratio rho (about 0.5: R and X(·, 0.15) pieces put ~5x more tokens "
        "in the encoder than in the decoder), whatever order or rows the examples are packed in. Hence "
        "decoder padding >= 1 - rho * enc_len / dec_len (the floor column, at zero encoder padding): "
        "about half the decoder at equal lengths. Preferring target-heavy buffered pieces only moves "
        "them earlier (it cannot change rho without starving or dropping pieces). rho also falls as "
        "dec_len shrinks, because S and X(·, 0.5) pieces are capped by the decoder, so at 512/256 and "
        "1024/512 the decoder still sits a few points above a floor of ~17-20%.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
