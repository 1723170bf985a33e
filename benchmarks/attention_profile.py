"""Where the attention kernels' time goes: device time per kernel (torch.profiler) for one forward+backward,
the autotuner's chosen configs, and the host time per call, for a few cells of the bench_attention setting.

Cells: no bias vs T5 bias (both inner-loop variants), causal and not, the packed 8-document row; SDPA
without bias as the reference. Prints one JSON line per cell and writes attention_profile_<date>.json.

    PYTHONPATH=src python3 benchmarks/attention_profile.py --out OUT_DIR
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from fat5.ops import attention_triton as at  # noqa: E402
from fat5.positions import relative_position_bucket  # noqa: E402

H, BUCKETS, MAXDIST, TOKENS = 12, 32, 128, 32768


def inputs(length, d, seed=0, batch=None, kv_length=None):
    b = batch or max(TOKENS // length, 1)
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda n: torch.randn(b, H, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    q = mk(length).requires_grad_(True)
    k, v = (mk(kv_length or length).requires_grad_(True) for _ in range(2))
    with torch.no_grad():
        q.mul_(0.1)
    table = (torch.randn(BUCKETS, H, device="cuda", generator=g) * 0.5).requires_grad_(True)
    return q, k, v, table


def t5_bias_dense(table, m, n, q_offset, bidirectional, max_distance):
    """The T5 bias (1, H, M, N) fp32 materialised from the (buckets, H) table by a one-hot matmul (its gradient
    into the table is a matmul too), for the "t5-dense" cells: the kernels' dense-bias path against the T5
    buckets computed in-kernel."""
    nb, h = table.shape
    rel = (
        torch.arange(n, device=table.device)[None, :]
        - (torch.arange(m, device=table.device) + q_offset)[:, None]
    )
    onehot = F.one_hot(relative_position_bucket(rel, bidirectional, nb, max_distance).reshape(-1), nb).float()
    return (onehot @ table.float()).t().reshape(1, h, m, n)


def run_ours(q, k, v, table, causal, bias, seg):
    kw = {}
    if bias in ("t5", "t5-nograd"):
        kw = dict(rel_table=table, rel_bidirectional=not causal, rel_max_distance=MAXDIST)
    elif bias == "t5-dense":
        kw = dict(bias=t5_bias_dense(table, q.shape[2], k.shape[2], 0, not causal, MAXDIST))
    return at.flash_attention(q, k, v, causal=causal, q_segment_ids=seg, kv_segment_ids=seg, **kw)


def run_sdpa(q, k, v, table, causal, bias, seg):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0)


def profile(fn, args, grad):
    """Per-kernel device time (us) of one fwd+bwd, averaged over 5 profiled repetitions."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof

    for _ in range(3):
        fn(*args).backward(grad)
    torch.cuda.synchronize()
    with tprof(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn(*args).backward(grad)
        torch.cuda.synchronize()
    per = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name[:60]] += e.device_time / 5
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def host_us(fn, args, grad, n=20):
    """Host time of issuing one fwd+bwd (the GPU is kept busy by a large matmul first so this is host-only)."""
    torch.cuda.synchronize()
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(20):
        x @ x  # noqa: B018  (queue ~20 ms of GPU work so the launches below never wait for the GPU)
    t = time.perf_counter()
    for _ in range(n):
        fn(*args).backward(grad)
    dt = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument(
        "--cells",
        choices=("all", "table", "model", "l1024"),
        default="all",
        help="table: only the default variant's rows and SDPA; model: the three attentions of T5 v1.1 base at "
        "512/114, batch 64 (encoder self, decoder self, cross), the T5 table's gradient on and off, the T5 bias "
        "in the kernel against materialised from the table (t5-dense); l1024: the bench_attention rows at L = 1024 "
        "(batch 32), causal and not, with the T5 table's gradient on and off and without bias",
    )
    ap.add_argument("--tag", default="", help="suffix of the output file's name")
    args = ap.parse_args()
    cells = [
        ("sdpa", 64, 4096, False, "none", None, "table"),
        ("ours", 64, 4096, False, "none", None, "table"),
        ("ours", 64, 4096, False, "t5", None, "table"),
        ("ours", 64, 4096, False, "t5", None, "split"),
        ("sdpa", 64, 1024, True, "none", None, "table"),
        ("ours", 64, 1024, True, "t5", None, "table"),
        ("ours", 64, 4096, False, "t5", "packed", "split"),
        ("ours", 64, 4096, False, "t5", None, "split"),  # the same cell again: the run-to-run spread
    ]
    if args.cells == "table":
        cells = [
            ("sdpa", 64, 1024, False, "none", None, "table"),
            ("ours", 64, 1024, False, "t5", None, "table"),
            ("sdpa", 64, 4096, False, "none", None, "table"),
            ("ours", 64, 4096, False, "t5", None, "table"),
            ("ours", 64, 1024, True, "t5", None, "table"),
            ("ours", 64, 4096, False, "t5", "packed", "table"),
        ]
    if args.cells == "model":  # (impl, d, L, causal, bias, seg, variant, batch, kv length)
        cells = [
            ("sdpa", 64, 512, False, "none", None, "table", 64, 512),
            ("ours", 64, 512, False, "none", None, "table", 64, 512),
            ("ours", 64, 512, False, "t5", None, "table", 64, 512),
            ("ours", 64, 512, False, "t5-nograd", None, "table", 64, 512),
            ("sdpa", 64, 114, True, "none", None, "table", 64, 114),
            ("ours", 64, 114, True, "t5", None, "table", 64, 114),
            ("ours", 64, 114, True, "t5-dense", None, "table", 64, 114),
            ("ours", 64, 256, True, "t5", None, "table", 64, 256),
            ("ours", 64, 256, True, "t5-dense", None, "table", 64, 256),
            ("ours", 64, 512, False, "t5-dense", None, "table", 64, 512),
            ("ours", 64, 1024, False, "t5", None, "table", 32, 1024),
            ("sdpa", 64, 114, False, "none", None, "table", 64, 512),
            ("ours", 64, 114, False, "none", None, "table", 64, 512),
        ]
    if args.cells == "l1024":
        cells = [
            (impl, 64, 1024, causal, bias, None, "table", 32, 1024)
            for causal in (False, True)
            for impl, bias in (("sdpa", "none"), ("ours", "none"), ("ours", "t5"), ("ours", "t5-nograd"))
        ]
    cells = [c if len(c) == 9 else (*c, None, None) for c in cells]
    results = []
    for impl, d, length, causal, bias, seg_kind, variant, batch, kv_length in cells:
        at.set_variant(variant)
        q, k, v, table = inputs(length, d, batch=batch, kv_length=kv_length)
        if bias == "t5-nograd":
            table.requires_grad_(False)
        seg = None
        if seg_kind == "packed":
            cuts = torch.tensor([277, 1459, 2057, 2185, 2237, 2626, 3566])
            seg = torch.bucketize(torch.arange(length), cuts, right=True).to(torch.int32)
            seg = seg[None].expand(q.shape[0], length).contiguous().cuda()
        fn = run_ours if impl == "ours" else run_sdpa
        a = (q, k, v, table, causal, bias, seg)
        grad = torch.randn_like(q)
        flops = 4 * q.shape[0] * H * length * k.shape[2] * d / (2 if causal else 1)
        fwd = triton.testing.do_bench(lambda: fn(*a), warmup=10, rep=40, return_mode="median")  # noqa: B023
        fb = triton.testing.do_bench(
            lambda: fn(*a).backward(grad),  # noqa: B023
            warmup=10,
            rep=40,
            grad_to_none=[q, k, v] + ([table] if table.requires_grad else []),
            return_mode="median",
        )
        row = {
            "impl": impl,
            "d": d,
            "L": length,
            "N": k.shape[2],
            "B": q.shape[0],
            "causal": causal,
            "bias": bias,
            "seg": seg_kind,
            "variant": variant,
            "fwd_ms": round(fwd, 4),
            "fwdbwd_ms": round(fb, 4),
            "fwd_tflops": round(flops / fwd / 1e9, 1),
            "fwdbwd_tflops": round(3.5 * flops / fb / 1e9, 1),
            "kernels_us": {k_: round(v_, 1) for k_, v_ in profile(fn, a, grad).items()},
            "host_us": round(host_us(fn, a, grad), 1),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, table
        torch.cuda.empty_cache()
    cfg = at.autotuned_configs()
    print(json.dumps(cfg, indent=1))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(
        args.out, f"attention_profile_{datetime.date.today().isoformat()}_{args.cells}{args.tag}.json"
    )
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": results, "best_configs": cfg}, f, indent=1)


if __name__ == "__main__":
    main()
