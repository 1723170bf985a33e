"""Do the kernels train like the reference? The same UL2 run on real text with the Triton kernels and with the
plain-PyTorch reference path (same seed, same batches), loss curves compared and plotted.

Data: the built-in corpus (Python standard library sources), a BPE tokenizer trained on it, the default UL2
mixture packed at --enc-len/--dec-len. bf16 autocast + AdamW. Run on a CUDA machine from the repository root:
`PYTHONPATH=src python3 benchmarks/convergence.py --out benchmarks/results`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fat5 import FAT5Config, FAT5ForConditionalGeneration, ops  # noqa: E402
from fat5.bench import _head_commit  # noqa: E402
from fat5.data import TokenDataset, UL2Batches, builtin_corpus, prepare, train_tokenizer  # noqa: E402


def batches(data_dir: Path, tok, args) -> list[dict]:
    ds = TokenDataset(data_dir, "train")
    it = UL2Batches(ds, tok, enc_len=args.enc_len, dec_len=args.dec_len, batch_size=args.batch, seed=0)
    return list(itertools.islice(iter(it), args.steps))


def train(backend: str, data: list[dict], vocab: int, args, device, perturb: float = 0.0) -> list[float]:
    """Loss per step. ``perturb``: scale every initial weight by (1 + perturb * N(0, 1)), a seeded
    perturbation at the size of bf16 rounding, for a run of the same path that differs only by such noise."""
    ops.set_backend(backend)
    torch.manual_seed(0)
    cfg = FAT5Config.from_preset(
        "small", vocab_size=vocab, num_layers=args.layers, num_decoder_layers=args.layers, z_loss=1e-4
    )
    model = FAT5ForConditionalGeneration(cfg).to(device).train()
    if perturb:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + perturb * torch.randn(p.shape, generator=gen).to(device))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    losses = []
    for i, b in enumerate(data):
        b = {k: v.to(device) for k, v in b.items()}
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (i + 1) / 50)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    ops.set_backend("auto")
    return losses


def smooth(x: list[float], w: int = 20) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(x):
        acc += v
        if i >= w:
            acc -= x[i - w]
        out.append(acc / min(i + 1, w))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--enc-len", type=int, default=512)
    p.add_argument("--dec-len", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--docs", type=int, default=400)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument(
        "--noise",
        type=float,
        default=2.0**-9,
        help="relative weight perturbation of the yardstick run (the reference path again from perturbed "
        "weights; half a bf16 ulp by default); 0 skips that run",
    )
    p.add_argument(
        "--commit",
        default=None,
        help="commit of the code that runs (default: git HEAD, marked when the tree differs)",
    )
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp())
    t0 = time.time()
    tok = train_tokenizer(builtin_corpus(max_docs=args.docs), 4000, work / "tok", kind="bpe")
    prepare(builtin_corpus(max_docs=args.docs), tok, work / "data", val_fraction=0.0)
    data = batches(work / "data", tok, args)
    print(f"data ready in {time.time() - t0:.0f}s: {len(data)} batches", flush=True)
    curves = {}
    runs = [("triton", "triton", 0.0), ("reference", "reference", 0.0)]
    if args.noise:
        runs.append(("reference_perturbed", "reference", args.noise))
    for name, backend, perturb in runs:
        t1 = time.time()
        curves[name] = train(backend, data, len(tok), args, device, perturb)
        print(
            f"{name}: {time.time() - t1:.0f}s, final smoothed loss {smooth(curves[name])[-1]:.4f}", flush=True
        )
    sk, sr = smooth(curves["triton"]), smooth(curves["reference"])
    rel = [abs(a - b) / b for a, b in zip(sk, sr)]
    # the yardstick: how far the same reference path drifts from itself after a bf16-sized nudge of the weights
    noise = None
    if "reference_perturbed" in curves:
        sp = smooth(curves["reference_perturbed"])
        noise = [abs(a - b) / b for a, b in zip(sp, sr)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    day = time.strftime("%Y-%m-%d")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(curves["reference"], alpha=0.3, color="C0")
    ax.plot(curves["triton"], alpha=0.3, color="C1")
    ax.plot(sr, label="reference path", color="C0")
    ax.plot(sk, label="Triton kernels", color="C1")
    if noise is not None:
        ax.plot(sp, label=f"reference, weights perturbed by {args.noise:.2g}", color="0.4", linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel("UL2 loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{day}-convergence.png", dpi=120)
    after = lambda xs: max(xs[50:]) if xs is not None and len(xs) > 50 else None  # noqa: E731
    summary = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
        commit=args.commit or _head_commit(), args=vars(args), max_rel_gap_smoothed_after_50=after(rel),
        noise_max_rel_gap_smoothed_after_50=after(noise),
        final_smoothed={name: smooth(c)[-1] for name, c in curves.items()}, curves=curves,
    )  # fmt: skip
    (out / f"{day}-convergence.json").write_text(json.dumps(summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "curves"}))


if __name__ == "__main__":
    main()
