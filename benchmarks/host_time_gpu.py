"""Host time and wall time of fat5's Triton ops on the GPU, with the memoised launch path (ops/launch.py) on and
off, interleaved in one process; plus a cProfile of one attention forward+backward each way.

host_us: time to issue one call (forward+backward where it says so) while the GPU is kept busy by queued
matmuls, so it is pure host work. wall_ms: triton.testing.do_bench median (events around each call), which is
the host time wherever that exceeds the kernels' time.

    python3 benchmarks/host_time_gpu.py --out benchmarks/results --tag 2026-12-04 --commit <hash>
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fat5.ops import launch  # noqa: E402
from fat5.ops.activations import gated_act_triton  # noqa: E402
from fat5.ops.attention_triton import flash_attention  # noqa: E402
from fat5.ops.rmsnorm import rms_norm_triton  # noqa: E402

DOCS = [277, 1182, 598, 128, 52, 389, 940, 530]  # bench_attention.py's packed row


def _busy():
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(30):
        x @ x  # noqa: B018  (~30 ms of queued GPU work: the calls timed next never wait for the GPU)


def host_us(fn, n=20):
    torch.cuda.synchronize()
    _busy()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return dt


def attention_case(b, length, causal, packed=False, decode=False, fwd_only=False, d=64, h=12):
    dev, dt = "cuda", torch.bfloat16
    m = 1 if decode else length
    q = torch.randn(b, h, m, d, device=dev, dtype=dt, requires_grad=not decode)
    k = torch.randn(b, h, length, d, device=dev, dtype=dt, requires_grad=not decode)
    v = torch.randn(b, h, length, d, device=dev, dtype=dt, requires_grad=not decode)
    table = torch.randn(32, h, device=dev, requires_grad=not decode)
    kw = {}
    if packed:
        ids = torch.cat([torch.full((n,), i) for i, n in enumerate(DOCS)]).to(dev).expand(b, -1).contiguous()
        kw = {"q_segment_ids": ids, "kv_segment_ids": ids}
    g = torch.randn_like(q)

    def call():
        if decode:
            with torch.no_grad():
                return flash_attention(q, k, v, causal=True, rel_table=table, rel_bidirectional=False)
        if fwd_only:  # with autograd recording, as a training forward
            return flash_attention(
                q, k, v, causal=causal, rel_table=table, rel_bidirectional=not causal, **kw
            )
        out = flash_attention(q, k, v, causal=causal, rel_table=table, rel_bidirectional=not causal, **kw)
        out.backward(g)
        for t in (q, k, v, table):
            t.grad = None
        return out

    return call


def rmsnorm_case(tokens=32768, d=768):
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(d, device="cuda", requires_grad=True)
    g = torch.randn_like(x)

    def call():
        rms_norm_triton(x, w, 1e-6).backward(g)
        x.grad = w.grad = None

    return call


def act_case(tokens=32768, f=2048):
    gate = torch.randn(tokens, f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn_like(gate, requires_grad=True)
    g = torch.randn_like(gate)

    def call():
        gated_act_triton(gate, up, "gelu_tanh").backward(g)
        gate.grad = up.grad = None

    return call


CASES = {
    "attention T5 512, b64": lambda: attention_case(64, 512, False),
    "attention T5 1024 causal, b32": lambda: attention_case(32, 1024, True),
    "attention T5 1024 causal, b32, fwd only": lambda: attention_case(32, 1024, True, fwd_only=True),
    "attention T5 1024, b32": lambda: attention_case(32, 1024, False),
    "attention T5 8 packed docs 4096, b8": lambda: attention_case(8, 4096, False, packed=True),
    "attention T5 decode 1 x 512, b64 (fwd only)": lambda: attention_case(64, 512, True, decode=True),
    "rmsnorm 32768 x 768": rmsnorm_case,
    "gated gelu 32768 x 2048": act_case,
}


def profile_text(fn, n=50):
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    _busy()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    return s.getvalue()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default=time.strftime("%Y-%m-%d"))
    ap.add_argument("--commit", default="")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--cases", default="", help="comma-separated substrings of case names to run (default all)"
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    wanted = [c for c in args.cases.split(",") if c]
    for name, make in CASES.items():
        if wanted and not any(w in name for w in wanted):
            continue
        fn = make()
        for flag in (True, False):  # warm up (compile, autotune) both paths
            launch.ENABLED = flag
            fn()
        host = {True: [], False: []}
        wall = {True: [], False: []}
        for _ in range(args.reps):
            for flag in (True, False):
                launch.ENABLED = flag
                host[flag].append(host_us(fn))
                wall[flag].append(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))
        launch.ENABLED = True
        row = {
            "case": name,
            "host_us_memo": statistics.median(host[True]),
            "host_us_triton": statistics.median(host[False]),
            "wall_ms_memo": statistics.median(wall[True]),
            "wall_ms_triton": statistics.median(wall[False]),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    prof = {}
    for name in ("attention T5 512, b64", "attention T5 1024 causal, b32, fwd only"):
        fn = CASES[name]()
        fn()
        prof[name] = profile_text(fn)
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": args.commit,
    }
    (out / f"host_time_{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"# Host time of the Triton ops, memoised launches on and off ({args.tag})",
        "",
        f"{meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; code {args.commit}. "
        "Command: `python3 benchmarks/host_time_gpu.py`. Medians of "
        f"{args.reps} interleaved repeats. host_us: issuing one call (fwd+bwd unless marked) while the GPU is "
        "busy; wall ms: do_bench median.",
        "",
        "| case | host us, memo | host us, Triton path | wall ms, memo | wall ms, Triton path |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['host_us_memo']:.0f} | {r['host_us_triton']:.0f} | {r['wall_ms_memo']:.4f} "
            f"| {r['wall_ms_triton']:.4f} |"
        )
    for name, text in prof.items():
        lines += ["", f"## cProfile, {name}, 50 calls, memoised launches", "", "```", text, "```"]
    (out / f"host_time_{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
