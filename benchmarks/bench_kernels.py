"""Are the Triton RMSNorm, fused linear cross-entropy and gated-activation kernels worth it on this GPU?

Compares each kernel (forward + backward through autograd, the way the model calls it) with torch eager and
torch.compile in the same process, as the median of ``triton.testing.do_bench``; memory-bound ops are reported
as effective bandwidth (bytes each pass must move, read + written) against a measured device-to-device copy.
Every op is timed twice: as launched from Python (what a training step pays when the CPU is not ahead) and
replayed from a CUDA graph (the GPU time alone, what a step pays once launches overlap earlier work).

Targets (from the task that introduced the kernels):
  RMSNorm, 32768 tokens x d in {512, 768, 1024, 4096}, bf16, fwd+bwd: >= 85% of copy bandwidth, >= 1.2x compile.
  Linear cross-entropy, 16384 tokens, d 768, vocab 32128, bf16: peak memory <= 1/4 of eager, time <= eager.
  Gated gelu_tanh, 32768 x 2048, bf16, fwd+bwd: >= 85% of copy bandwidth.

Usage: PYTHONPATH=src python benchmarks/bench_kernels.py --out benchmarks/results/
Writes kernels_<date>.md and kernels_<date>.json under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from fat5.ops.activations import (
    gated_act_packed_ref,
    gated_act_packed_triton,
    gated_act_ref,
    gated_act_triton,
)
from fat5.ops.cross_entropy import linear_cross_entropy_ref, linear_cross_entropy_triton
from fat5.ops.rmsnorm import TUNE as RMS_TUNE
from fat5.ops.rmsnorm import rms_norm_ref, rms_norm_triton

BF16 = 2  # bytes
_COMPILED: dict = {}


def compiled(fn):
    """One torch.compile wrapper per function, so the CUDA-graph pass reuses the first pass's compilation."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def median_ms(fn, graph: bool) -> float | None:
    try:
        if graph:
            return do_bench_cudagraph(fn, rep=100, return_mode="median")
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    except Exception as e:  # a variant that cannot be captured in a graph is reported, not fatal
        print(f"  timing failed ({'graph' if graph else 'eager'}): {type(e).__name__}: {str(e)[:200]}")
        return None


def copy_bandwidth() -> float:
    x = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB: far past the 60 MB L2
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() * BF16 / ms / 1e6  # GB/s, read + write


def fwd_bwd(fn, inputs, grad_out):
    def step():
        out = fn(*inputs)
        torch.autograd.grad(
            out, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad], grad_out
        )

    return step


def with_tune(step, **tune):
    """The same step with RMSNorm's TUNE overrides set while it runs (options measured before they ship)."""

    def run():
        RMS_TUNE.update(tune)
        try:
            step()
        finally:
            for k in tune:
                RMS_TUNE.pop(k, None)

    return run


# RMSNorm variants other than the shipped one: TUNE overrides (fat5.ops.rmsnorm.TUNE)
RMS_OPTIONS = {
    "triton no PDL": {"pdl": False},
    "triton chunk 128": {"chunk": 128, "fwd_chunk": 128},
    "triton chunk 256": {"chunk": 256, "fwd_chunk": 256},
    "triton in-kernel dw": {"fused_reduce": True},
    "triton chunk 256 + in-kernel dw": {"chunk": 256, "fwd_chunk": 256, "fused_reduce": True},
    "triton strided": {"strided": True},
    "triton band": {"strided": False},
    "triton strided + in-kernel dw": {"strided": True, "fused_reduce": True},
    "triton no L2 prefetch": {"prefetch": 0},
    "triton L2 prefetch 1": {"prefetch": 1},
    "triton L2 prefetch 3": {"prefetch": 3},
    "triton no reduce release": {"reduce_release": False},
    "triton stream hints": {"stream": True},
    "triton 3/SM (168 registers)": {"maxnreg": 168, "per_sm": 3, "even_bands": True},
}


def bench_rmsnorm(tokens: int, widths, results, graph: bool):
    rows = []
    for d in widths:
        x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (1 + 0.1 * torch.randn(d, device="cuda")).to(torch.bfloat16).requires_grad_()
        dy = torch.randn_like(x)
        # fwd reads x, w and writes y; bwd reads x, dy, w and writes dx
        nbytes = (2 * tokens * d + d + 3 * tokens * d + d) * BF16
        variants = {
            "triton": rms_norm_triton,
            **{name: rms_norm_triton for name in RMS_OPTIONS},
            "eager": rms_norm_ref,
            "compile": compiled(rms_norm_ref),
        }
        for name, fn in variants.items():
            step = fwd_bwd(lambda x, w, fn=fn: fn(x, w, 1e-6), (x, w), dy)
            if name in RMS_OPTIONS:
                step = with_tune(step, **RMS_OPTIONS[name])
            step()  # compile / warm up outside the timed region
            row = dict(op="rms_norm", d=d, tokens=tokens, variant=name, bytes=nbytes)
            row["ms"] = median_ms(step, graph=False)
            row["graph_ms"] = median_ms(step, graph=True) if graph else None
            rows.append(row)
            print(f"rms_norm d={d} {name}: {row['ms']} ms launched, {row['graph_ms']} ms graph")
        # what the same traffic costs torch's own streaming kernels at this size: a copy (1 read, 1 write, as the
        # forward) then an add (2 reads, 1 write, as the backward), no reductions. Graph time of this pair is a
        # practical floor for a two-kernel fwd+bwd of these bytes (the copy bandwidth above is measured on 1 GiB)
        xs, ys, zs = x.detach(), torch.empty_like(x), torch.empty_like(x)

        def bound(xs=xs, ys=ys, zs=zs, dy=dy):
            ys.copy_(xs)
            torch.add(xs, dy, out=zs)

        bound()
        row = dict(op="rms_norm", d=d, tokens=tokens, variant="bound: copy + add", bytes=nbytes)
        row["ms"] = median_ms(bound, graph=False)
        row["graph_ms"] = median_ms(bound, graph=True) if graph else None
        rows.append(row)
        print(f"rms_norm d={d} bound: {row['ms']} ms launched, {row['graph_ms']} ms graph")
        del x, w, dy, xs, ys, zs
    results["rms_norm"] = rows
    return rows


def bench_act(tokens: int, width: int, results, graph: bool):
    g = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn_like(g, requires_grad=True)
    do = torch.randn_like(g)
    nbytes = 3 * g.numel() * BF16 + 5 * g.numel() * BF16  # fwd: g, u -> out; bwd: do, g, u -> dg, du
    rows = []
    variants = {
        "triton": gated_act_triton,
        "eager": gated_act_ref,
        "compile": compiled(gated_act_ref),
    }
    for name, fn in variants.items():
        step = fwd_bwd(lambda g, u, fn=fn: fn(g, u, "gelu_tanh"), (g, u), do)
        step()
        row = dict(op="gated_act", act="gelu_tanh", tokens=tokens, width=width, variant=name, bytes=nbytes)
        row["ms"] = median_ms(step, graph=False)
        row["graph_ms"] = median_ms(step, graph=True) if graph else None
        rows.append(row)
        print(f"gated_act {name}: {row['ms']} ms launched, {row['graph_ms']} ms graph")
    results["gated_act"] = rows
    return rows


def _timed_row(step, row: dict, graph: bool) -> dict:
    step()  # compile / warm up outside the timed region
    row["ms"] = median_ms(step, graph=False)
    row["graph_ms"] = median_ms(step, graph=True) if graph else None
    print(f"{row['op']} {row['variant']}: {row['ms']} ms launched, {row['graph_ms']} ms graph")
    return row


def bench_model_cases(tokens: int, d: int, d_ff: int, results, graph: bool):
    """The two ops as the model calls them under bf16 autocast, against what it did before:
    - RMSNorm adding a bf16 layer output onto the fp32 residual stream, normed output for the next GEMM in
      bf16 ('triton'), against the promoted path (x widened to fp32, fp32 output cast to bf16 afterwards);
    - the gated activation on one packed (tokens, 2 d_ff) projection ('triton packed'), against two
      separate (tokens, d_ff) projections (what two input GEMMs give) and torch.compile of the reference."""
    rows = []
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(tokens, d, device="cuda", requires_grad=True)
    w = (1 + 0.1 * torch.randn(d, device="cuda")).requires_grad_()
    dy, dh = torch.randn_like(x), torch.randn_like(r)
    # fwd reads x (2 B), r (4 B), writes h (4 B), y (2 B); bwd reads dy (2), dh (4), h (4), writes dr (4), dx (2)
    nbytes = 28 * tokens * d

    def promoted(x, w, eps, r):
        y, h = rms_norm_triton(x, w, eps, r)
        return y.to(torch.bfloat16), h

    variants = {
        "triton": lambda x, w, eps, r: rms_norm_triton(x, w, eps, r, torch.bfloat16),
        "triton promoted": promoted,
        "compile": compiled(lambda x, w, eps, r: rms_norm_ref(x, w, eps, r, torch.bfloat16)),
    }
    for name, fn in variants.items():
        step = fwd_bwd(lambda x, w, r, fn=fn: fn(x, w, 1e-6, r), (x, w, r), (dy, dh))
        row = dict(op="rms_norm_mixed", d=d, tokens=tokens, variant=name, bytes=nbytes)
        rows.append(_timed_row(step, row, graph))
    del x, r, w, dy, dh
    gu = torch.randn(tokens, 2 * d_ff, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, d_ff, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn_like(g, requires_grad=True)
    do = torch.randn_like(g)
    nbytes = 8 * tokens * d_ff * BF16
    cases = {
        "triton packed": ((gu,), lambda gu: gated_act_packed_triton(gu, "gelu_tanh")),
        "triton separate": ((g, u), lambda g, u: gated_act_triton(g, u, "gelu_tanh")),
        "compile packed": ((gu,), compiled(lambda gu: gated_act_packed_ref(gu, "gelu_tanh"))),
    }
    for name, (inputs, fn) in cases.items():
        row = dict(op="gated_act_packed", tokens=tokens, width=d_ff, variant=name, bytes=nbytes)
        rows.append(_timed_row(fwd_bwd(fn, inputs, do), row, graph))
    results["model_cases"] = rows
    return rows


def bench_linear_ce(tokens: int, d: int, vocab: int, results):
    hidden = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(vocab, d, device="cuda") * d**-0.5).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    labels[torch.rand(tokens, device="cuda") < 0.1] = -100  # some padding, as in real batches

    def eager(h, w):  # what a plain model does: bf16 logits, then F.cross_entropy
        return F.cross_entropy(h @ w.t(), labels, ignore_index=-100)

    variants = {
        "triton": lambda h, w: linear_cross_entropy_triton(h, w, labels)[0],
        "eager": eager,
        "reference": lambda h, w: linear_cross_entropy_ref(h, w, labels)[0],  # fat5's fp32-logits spec
    }
    rows = []
    for name, fn in variants.items():
        step = fwd_bwd(fn, (hidden, weight), None)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        row = dict(op="linear_cross_entropy", tokens=tokens, d=d, vocab=vocab, variant=name)
        row["ms"] = median_ms(step, graph=False)
        row["peak_extra_mib"] = peak / 2**20
        row["tflops"] = 3 * 2 * tokens * d * vocab / (row["ms"] * 1e9) if row["ms"] else None
        rows.append(row)
        print(f"linear_ce {name}: {row['ms']} ms, peak +{row['peak_extra_mib']:.0f} MiB")
    results["linear_cross_entropy"] = rows
    return rows


def gbps(row, key):
    return row["bytes"] / row[key] / 1e6 if row.get(key) else None


def fmt(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def _bw_cells(r, copy_bw) -> str:
    """launched ms | GB/s | % copy | graph ms | GB/s | % copy, for one row."""
    bw, gbw = gbps(r, "ms"), gbps(r, "graph_ms")
    return (
        f"{fmt(r['ms'], '.4f')} | {fmt(bw, '.0f')} | {fmt(bw and 100 * bw / copy_bw, '.0f')} | "
        f"{fmt(r.get('graph_ms'), '.4f')} | {fmt(gbw, '.0f')} | {fmt(gbw and 100 * gbw / copy_bw, '.0f')}"
    )


def report(results, env) -> str:
    copy_bw = results["copy_gbps"]
    out = [f"# Kernel benchmarks, {env['date']}", ""]
    out += [
        f"GPU {env['gpu']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; commit "
        f"{env['commit']}; device-to-device copy {copy_bw:.0f} GB/s (read + write, 1 GiB bf16).",
        "",
    ]
    out += [
        "Median of triton.testing.do_bench. 'launched': fwd+bwd called from Python through autograd; "
        "'graph': the same step replayed from a CUDA graph (GPU time only). Bandwidth = bytes the op must "
        "move (fwd reads x, w, writes y; bwd reads x, dy, w, writes dx) / time.",
        "",
    ]
    checks = []
    if results.get("rms_norm"):
        out += [
            "## RMSNorm, bf16, fwd+bwd",
            "",
            "| tokens x d | variant | launched ms | GB/s | % copy | graph ms | GB/s | % copy |",
            "|---|---|---|---|---|---|---|---|",
        ]
        by = {(r["d"], r["variant"]): r for r in results["rms_norm"]}
        for r in results["rms_norm"]:
            out.append(f"| {r['tokens']} x {r['d']} | {r['variant']} | {_bw_cells(r, copy_bw)} |")
        out.append("")
        for d in sorted({r["d"] for r in results["rms_norm"]}):
            t, c = by[(d, "triton")], by[(d, "compile")]
            for key, label in (("ms", "launched"), ("graph_ms", "graph")):
                bw = gbps(t, key)
                speed = c[key] / t[key] if t.get(key) and c.get(key) else None
                checks.append(
                    (
                        f"RMSNorm d={d} ({label}): >= 85% of copy bandwidth",
                        bw is not None and bw >= 0.85 * copy_bw,
                        # one decimal more than the tables: a miss never reads as the threshold itself
                        f"{fmt(bw and 100 * bw / copy_bw, '.1f')}%",
                    )
                )
                checks.append(
                    (
                        f"RMSNorm d={d} ({label}): >= 1.2x torch.compile",
                        speed is not None and speed >= 1.2,
                        f"{fmt(speed, '.3f')}x",
                    )
                )
    if results.get("linear_cross_entropy"):
        ce = {r["variant"]: r for r in results["linear_cross_entropy"]}
        r0 = results["linear_cross_entropy"][0]
        out += [
            "## Fused linear cross-entropy, bf16, fwd+bwd",
            "",
            f"{r0['tokens']} tokens, d {r0['d']}, vocab {r0['vocab']}, 10% of labels ignored. Peak = max allocated "
            "during fwd+bwd above what was allocated before it (inputs excluded, returned grads included).",
            "",
            "| variant | ms | TFLOP/s (3 matmuls) | peak extra MiB |",
            "|---|---|---|---|",
        ]
        for r in results["linear_cross_entropy"]:
            out.append(
                f"| {r['variant']} | {fmt(r['ms'], '.3f')} | {fmt(r['tflops'], '.0f')} | {r['peak_extra_mib']:.0f} |"
            )
        out.append("")
        t, e = ce["triton"], ce["eager"]
        checks.append(
            (
                "Linear CE: peak memory <= 1/4 of eager",
                t["peak_extra_mib"] <= e["peak_extra_mib"] / 4,
                f"{t['peak_extra_mib'] / e['peak_extra_mib']:.3f} of eager",
            )
        )
        checks.append(
            (
                "Linear CE: time <= eager",
                t["ms"] is not None and e["ms"] is not None and t["ms"] <= e["ms"],
                f"{fmt(t['ms'] and e['ms'] and t['ms'] / e['ms'], '.2f')} of eager",
            )
        )
    if results.get("gated_act"):
        out += [
            "## Gated activation (gelu_tanh), bf16, fwd+bwd",
            "",
            "Bytes: fwd reads gate, up, writes out; bwd reads dout, gate, up, writes dgate, dup.",
            "",
            "| shape | variant | launched ms | GB/s | % copy | graph ms | GB/s | % copy |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in results["gated_act"]:
            out.append(f"| {r['tokens']} x {r['width']} | {r['variant']} | {_bw_cells(r, copy_bw)} |")
            if r["variant"] == "triton":
                for key, label in (("ms", "launched"), ("graph_ms", "graph")):
                    bw = gbps(r, key)
                    checks.append(
                        (
                            f"Gated act ({label}): >= 85% of copy bandwidth",
                            bw is not None and bw >= 0.85 * copy_bw,
                            f"{fmt(bw and 100 * bw / copy_bw, '.0f')}%",
                        )
                    )
    if results.get("model_cases"):
        out += [
            "",
            "## As the model calls them (bf16 autocast, fp32 residual stream)",
            "",
            "RMSNorm: bf16 layer output + fp32 residual, bf16 normed output (28 bytes/element fwd+bwd); "
            "'triton promoted' is the path before: x widened to fp32, fp32 output cast to bf16 after. Gated "
            "act: one packed (tokens, 2 d_ff) projection against two separate tensors.",
            "",
            "| op | shape | variant | launched ms | GB/s | % copy | graph ms | GB/s | % copy |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["model_cases"]:
            shape = f"{r['tokens']} x {r.get('d', r.get('width'))}"
            out.append(f"| {r['op']} | {shape} | {r['variant']} | {_bw_cells(r, copy_bw)} |")
    out += ["", "## Targets", "", "| target | met | measured |", "|---|---|---|"]
    out += [f"| {name} | {'yes' if ok else 'NO'} | {val} |" for name, ok, val in checks]
    return "\n".join(out) + "\n"


def environment() -> dict:
    commit = os.environ.get("FAT5_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return dict(
        date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(), commit=commit,
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/", help="folder for the markdown report and raw JSON")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph re-timing")
    p.add_argument(
        "--ops",
        default="rms_norm,linear_cross_entropy,gated_act,model",
        help="comma-separated sections to run",
    )
    p.add_argument(
        "--rms-options",
        default="all",
        help="RMSNorm option rows to time besides the default: all, none, or names separated by ';' "
        f"(of: {'; '.join(RMS_OPTIONS)})",
    )
    args = p.parse_args()
    if args.rms_options != "all":
        keep = [] if args.rms_options == "none" else args.rms_options.split(";")
        unknown = set(keep) - set(RMS_OPTIONS)
        if unknown:
            raise SystemExit(
                f"--rms-options: unknown row(s) {sorted(unknown)}; choose from {list(RMS_OPTIONS)}"
            )
        for name in set(RMS_OPTIONS) - set(keep):
            del RMS_OPTIONS[name]
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU")
    t0 = time.time()
    env = environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels_{env['date']}"
    results = {"env": env, "copy_gbps": copy_bandwidth()}
    print(f"copy bandwidth {results['copy_gbps']:.0f} GB/s")
    graph = not args.no_graph
    sections = {
        "rms_norm": lambda: bench_rmsnorm(32768, (512, 768, 1024, 4096), results, graph),
        "linear_cross_entropy": lambda: bench_linear_ce(16384, 768, 32128, results),
        "gated_act": lambda: bench_act(32768, 2048, results, graph),
        "model": lambda: bench_model_cases(32768, 768, 2048, results, graph),
    }
    wanted = args.ops.split(",")
    unknown = set(wanted) - set(sections)
    if unknown:
        raise SystemExit(f"--ops: unknown section(s) {sorted(unknown)}; choose from {sorted(sections)}")
    for name in wanted:
        sections[name]()
        results["wall_s"] = time.time() - t0
        (out / f"{stem}.json").write_text(
            json.dumps(results, indent=1)
        )  # what ran is kept if a later op dies
    text = report(results, env)
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
