"""Training-step throughput of fat5 against transformers' T5 on the same GPU, weights and batch.

MFU = model FLOPs per step (fat5.flops.step_flops) / step time / the bf16 matmul rate measured in the same
run (8192^3 product), so the figure is relative to what this GPU actually reaches, not to a datasheet.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import FAT5Config
from .flops import step_flops
from .model import FAT5ForConditionalGeneration


def matmul_tflops(n: int = 8192) -> float:
    import triton.testing

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    return 2 * n**3 / ms / 1e9


@dataclass
class Result:
    impl: str
    preset: str
    l_enc: int
    l_dec: int
    batch: int
    tokens_per_s: float | None
    step_ms: float | None
    mfu: float | None
    peak_gib: float | None
    note: str = ""


def _hf_twin(model: FAT5ForConditionalGeneration):
    from transformers import T5Config, T5ForConditionalGeneration

    from .hf import hf_config_dict, hf_state_dict

    hf = T5ForConditionalGeneration(T5Config(**hf_config_dict(model.config)))
    sd = hf_state_dict(model)
    if "lm_head.weight" in sd:  # transformers >= 5 ties lm_head at init; keep the weights untied as in fat5
        hf.lm_head.weight = torch.nn.Parameter(sd["lm_head.weight"].clone())
    hf.load_state_dict(sd, strict=False)
    return hf


# kernel name -> part of the step, first match wins (profile mode)
PARTS = [
    (
        "attention",
        (
            "_fwd_kernel",
            "_dkv_kernel",
            "_dq_kernel",
            "_delta_kernel",
            "_segment_ranges",
            "flash",
            "fmha",
            "sdpa",
        ),
    ),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "splitkreduce", "wgmma")),
    ("rmsnorm", ("_rms_norm", "_sum_rows")),
    ("cross-entropy", ("_ce_", "cross_entropy", "log_softmax", "nll_loss")),
    ("gated act", ("_gated_act",)),
    ("optimizer", ("multi_tensor", "fused_adam", "adam")),
    ("compiled glue", ("triton_",)),
    ("copies", ("memcpy", "memset", "copy_")),
]


def _part(name: str) -> str:
    low = name.lower()
    for part, keys in PARTS:
        if any(k.lower() in low for k in keys):
            return part
    return "other eager ops"


def profile_step(step, n: int = 2) -> dict:
    """Device time of `n` steps split by part (torch.profiler), top kernels, and the wall time around them.

    One stream, so wall - device is time the GPU waited for the host (launch overhead, syncs)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n
    parts: dict[str, float] = {}
    kernels: dict[str, float] = {}
    calls: dict[str, int] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.device_time
        parts[_part(ev.name)] = parts.get(_part(ev.name), 0.0) + us / n / 1e3
        kernels[ev.name[:90]] = kernels.get(ev.name[:90], 0.0) + us / n / 1e3
        calls[ev.name[:90]] = calls.get(ev.name[:90], 0) + 1
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:60])
    return {
        "wall_ms": wall * 1e3,
        "device_ms": sum(parts.values()),
        "gpu_idle_ms": wall * 1e3 - sum(parts.values()),
        "parts_ms": dict(sorted(parts.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms": top,
        "top_kernels_calls_per_step": {k: calls[k] / n for k in top},
    }


def run_one(
    impl: str,
    preset: str,
    l_enc: int,
    l_dec: int,
    batch: int,
    steps: int,
    peak: float,
    prof_out: Path | None = None,
) -> Result:
    cfg = FAT5Config.from_preset(preset)
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(cfg)
    if impl.startswith("hf"):
        model = _hf_twin(model)
    ids = torch.randint(2, cfg.vocab_size, (batch, l_enc), device="cuda")
    labels = torch.randint(2, cfg.vocab_size, (batch, l_dec), device="cuda")
    if impl == "fat5-trainer":
        try:
            step = _trainer_step(model, ids, labels)
        except torch.OutOfMemoryError:
            return Result(impl, preset, l_enc, l_dec, batch, None, None, None, None, "out of memory")
        return _timed(impl, preset, cfg, l_enc, l_dec, batch, steps, peak, prof_out, step)
    model = model.cuda().train()
    if impl == "fat5-step-graph":
        # the graph's memory pool is filled while capturing: the peak counts from before the warm-up
        torch.cuda.reset_peak_memory_stats()
        step, opt, _ = _whole_step_graph(model, ids, labels)
        return _timed(
            impl, preset, cfg, l_enc, l_dec, batch, steps, peak, prof_out, step, opt, reset_peak=False
        )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    # fat5: torch.compile (default mode); fat5-graph: mode reduce-overhead, the forward and backward replayed
    # as CUDA graphs (no per-kernel launch cost); fat5-eager: no compile; hf / hf-compile likewise
    graphs = impl == "fat5-graph"
    if graphs:
        fwd = torch.compile(model, mode="reduce-overhead")
    elif impl.endswith("compile") or impl == "fat5":
        fwd = torch.compile(model)
    else:
        fwd = model

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _timed(impl, preset, cfg, l_enc, l_dec, batch, steps, peak, prof_out, step, opt)


def _whole_step_graph(
    model: FAT5ForConditionalGeneration, ids: torch.Tensor, labels: torch.Tensor, lr: float = 1e-4
):
    """fat5-step-graph: the model compiled (torch.compile, default mode), then forward, backward and torch's
    fused AdamW captured together as one CUDA graph. A replay is one launch: the host does no work between
    the backward and the optimizer or between steps, where the cudagraph-tree step (fat5-graph) still runs
    the autograd engine, the optimizer's launches and zero_grad on the host. Inputs are static tensors (a
    training loop copies each batch into them; with fixed shapes, as in pretraining, that is all it needs).
    Returns (replay, optimizer, the loss tensor each replay rewrites); the warm-up takes 3 real steps."""
    fwd = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True, capturable=True)

    def body():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        return loss

    # compile, autotune and allocate the optimizer state on a side stream first: a capture records kernels
    # only, nothing may compile, synchronise or allocate optimizer state inside it
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            body()
            opt.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # the gradients are allocated inside the capture (grad None before it), so each replay writes them afresh:
    # no accumulation across replays and no zeroing pass
    with torch.cuda.graph(graph):
        loss = body()
    return graph.replay, opt, loss


def _trainer_step(model: FAT5ForConditionalGeneration, ids: torch.Tensor, labels: torch.Tensor):
    """The training step of `fat5 pretrain` itself (Trainer.train_step: AdamWScale, gradient clipping, the
    device-side non-finite check; nothing read back per step), compiled with CUDA graphs (reduce-overhead)."""
    import atexit
    import shutil
    import tempfile

    from .runconfig import load_run_config
    from .train import Trainer

    b, le = ids.shape
    cfg = load_run_config(
        None,
        [
            f"train.batch_size={b}",
            f"train.enc_len={le}",
            f"train.dec_len={labels.shape[1]}",
            "train.compile=true",
            "train.compile_mode=reduce-overhead",
            "train.precision=bf16-autocast",
            "train.max_steps=1000000",
        ],
    )
    out = tempfile.mkdtemp(prefix="fat5-bench-")  # the trainer's logs; removed when the process exits
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    trainer = Trainer(cfg, model, iter(()), out, show_progress=False)
    batch = {"input_ids": ids, "labels": labels}

    def step():
        trainer.train_step([batch])

    return step


def _timed(
    impl, preset, cfg, l_enc, l_dec, batch, steps, peak, prof_out, step, opt=None, reset_peak=True
) -> Result:
    if reset_peak:
        torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        if prof_out is not None:
            prof = profile_step(step)
            prof.update(impl=impl, preset=preset, l_enc=l_enc, l_dec=l_dec, batch=batch, step_ms=dt * 1e3)
            prof_out.parent.mkdir(parents=True, exist_ok=True)
            with prof_out.open("a") as f:
                f.write(json.dumps(prof) + "\n")
            print(
                json.dumps({k: prof[k] for k in ("impl", "wall_ms", "device_ms", "gpu_idle_ms", "parts_ms")}),
                flush=True,
            )
    except torch.OutOfMemoryError:
        return Result(impl, preset, l_enc, l_dec, batch, None, None, None, None, "out of memory")
    except Exception as e:  # a failed variant is reported in the table, the others still run
        return Result(
            impl,
            preset,
            l_enc,
            l_dec,
            batch,
            None,
            None,
            None,
            None,
            f"failed: {type(e).__name__}: {e}"[:300],
        )
    finally:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        gc.collect()
    tokens = batch * (l_enc + l_dec)
    mfu = step_flops(cfg, batch, l_enc, l_dec) / dt / (peak * 1e12)
    res = Result(
        impl,
        preset,
        l_enc,
        l_dec,
        batch,
        tokens / dt,
        dt * 1e3,
        mfu,
        torch.cuda.max_memory_allocated() / 2**30,
    )
    torch.cuda.empty_cache()
    return res


SHAPES = [
    ("base", 512, 114, 64),
    ("base", 512, 114, 128),
    ("base", 1024, 1024, 16),
    ("base", 2048, 2048, 8),
    ("base", 4096, 4096, 4),
    ("base", 8192, 8192, 2),
    ("base", 16384, 16384, 1),
    ("fat5-small", 512, 512, 128),
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--impls",
        default="fat5-trainer,fat5-step-graph,fat5-graph,fat5,hf,hf-compile",
        help="fat5-trainer: the `fat5 pretrain` step (Trainer, AdamWScale, CUDA graphs); fat5-step-graph: the "
        "compiled model's forward, backward and fused AdamW as one captured CUDA graph; fat5-graph / fat5 / "
        "fat5-eager: the model compiled with CUDA graphs / compiled / eager, torch's fused AdamW; hf, hf-compile",
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--shapes", default="all", help="comma list of indices into SHAPES, or all")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="", help="suffix of the report's file name")
    p.add_argument(
        "--commit",
        default=None,
        help="commit of the code that runs, for the report (default: git HEAD, marked when the tree differs)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile 2 steps per row: device time by part and top kernels to <out>/<day>-model<tag>_profile.jsonl",
    )
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fat5 bench measures training steps on a CUDA GPU; none is visible here")
    peak = matmul_tflops()
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    results = []
    prof_out = (
        Path(args.out) / f"{time.strftime('%Y-%m-%d')}-model{args.tag}_profile.jsonl"
        if args.profile
        else None
    )
    for preset, le, ld, b in shapes:
        for impl in args.impls.split(","):
            r = run_one(impl, preset, le, ld, b, args.steps, peak, prof_out)
            results.append(r)
            print(json.dumps(asdict(r)), flush=True)
            # rewritten after every row: a process stopped by a time limit keeps the rows it measured
            write_report(results, peak, Path(args.out), args.tag, args.commit, quiet=True)
    write_report(results, peak, Path(args.out), args.tag, args.commit)


def _head_commit() -> str:
    """git HEAD, with "+ local changes" when tracked files differ from it (a copied working tree)."""
    run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
    head = run("rev-parse", "--short", "HEAD")
    if head and run("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks"):
        head += " + local changes"
    return head


def write_report(
    results: list[Result],
    peak: float,
    out: Path,
    tag: str = "",
    commit: str | None = None,
    quiet: bool = False,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    day = time.strftime("%Y-%m-%d")
    commit = commit or _head_commit()
    import transformers
    import triton

    lines = [
        f"# Training step: fat5 vs transformers T5 ({day})",
        "",
        f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"transformers {transformers.__version__}, commit {commit or 'n/a'}; bf16 autocast + fused AdamW; "
        f"measured bf16 matmul rate {peak:.0f} TFLOP/s (MFU denominator). Command: "
        "`python3 benchmarks/bench_model.py`.",
        "",
        "| model | enc/dec len | batch | impl | tokens/s | step ms | MFU | peak GiB | vs hf: speed, memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.tokens_per_s is None:
            lines.append(f"| {r.preset} | {r.l_enc}/{r.l_dec} | {r.batch} | {r.impl} | {r.note} | | | | |")
        else:
            lines.append(
                f"| {r.preset} | {r.l_enc}/{r.l_dec} | {r.batch} | {r.impl} | {r.tokens_per_s:,.0f} | "
                f"{r.step_ms:.1f} | {r.mfu:.1%} | {r.peak_gib:.1f} | {_vs_hf(r, results)} |"
            )
    plot = out / f"{day}-model{tag}.png"
    if _plot(results, plot):
        lines += ["", f"![tokens/s and peak memory per shape]({plot.name})"]
    (out / f"{day}-model{tag}.md").write_text("\n".join(lines) + "\n")
    (out / f"{day}-model{tag}.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    if not quiet:
        print("\n".join(lines))


def _shape(r: Result) -> tuple:
    return (r.preset, r.l_enc, r.l_dec, r.batch)


def _vs_hf(r: Result, results: list[Result]) -> str:
    """Speed and peak-memory ratio against the `hf` row of the same shape in the same run."""
    if r.impl == "hf":
        return ""
    hf = next((x for x in results if x.impl == "hf" and _shape(x) == _shape(r)), None)
    if hf is None:
        return ""
    if hf.tokens_per_s is None:
        return f"hf: {hf.note}"
    return f"{r.tokens_per_s / hf.tokens_per_s:.2f}x, {r.peak_gib / hf.peak_gib:.2f}x"


def _plot(results: list[Result], path: Path) -> bool:
    """Grouped bars per shape: tokens/s (log scale) and peak memory, one colour per implementation.
    Returns False (and writes nothing) when no row was measured."""
    done = [r for r in results if r.tokens_per_s is not None]
    if not done:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(_shape(r) for r in results))
    impls = list(dict.fromkeys(r.impl for r in results))
    width = 0.8 / len(impls)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.6 * len(shapes)), 7), sharex=True)
    for i, impl in enumerate(impls):
        rows = {_shape(r): r for r in done if r.impl == impl}
        xs = [j + (i - (len(impls) - 1) / 2) * width for j, s in enumerate(shapes) if s in rows]
        got = [rows[s] for s in shapes if s in rows]
        axes[0].bar(xs, [r.tokens_per_s for r in got], width, label=impl)
        axes[1].bar(xs, [r.peak_gib for r in got], width, label=impl)
        for j, sh in enumerate(shapes):  # a failed row (out of memory, ...) is named where its bar would be
            bad = [r for r in results if r.impl == impl and _shape(r) == sh and r.tokens_per_s is None]
            if bad:
                x = j + (i - (len(impls) - 1) / 2) * width
                axes[1].text(x, 0.5, bad[0].note[:24], rotation=90, ha="center", va="bottom", fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("tokens/s (encoder + decoder)")
    axes[1].set_ylabel("peak memory, GiB")
    axes[1].set_xticks(range(len(shapes)))
    axes[1].set_xticklabels([f"{p}\n{le}/{ld} b{b}" for p, le, ld, b in shapes], fontsize=8)
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"training step, {torch.cuda.get_device_name()}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main()
