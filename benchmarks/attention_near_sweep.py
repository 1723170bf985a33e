"""Sweep of the attention kernels' tile configs and near-diagonal step widths (at.NEAR), T5 bias, one GPU.

Each kernel is timed with one config at a time (its autotuner reduced to that config), the other two kernels
held at a fixed config: the forward alone; dk/dv and dq by the forward+backward time (median of do_bench).
Setting as bench_attention: bf16, 12 heads x 64, B*L = 32768, T5 buckets 32 / max distance 128.
Prints one JSON line per measurement and writes attention_near_sweep_<date>.json.
Run from the repository root on a CUDA machine: `PYTHONPATH=src python3 benchmarks/attention_near_sweep.py`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import triton
import triton.testing

from fat5.ops import attention_triton as at

H, D, TOKENS = 12, 64, 32768


def inputs(length):
    g = torch.Generator(device="cuda").manual_seed(0)
    b = TOKENS // length
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = (mk(b, H, length, D).requires_grad_(True) for _ in range(3))
    table = torch.randn(32, H, device="cuda", generator=g).requires_grad_(True)
    return q, k, v, table


def cfg_str(c):
    return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}"


def sweep_cell(length, causal, nears, rep, fwd_all, dkv_all, dq_all):
    q, k, v, table = inputs(length)
    grad = torch.randn_like(q)
    kw = dict(causal=causal, rel_table=table, rel_bidirectional=not causal, rel_max_distance=128)

    def fwd():
        return at.flash_attention(q, k, v, **kw)

    def fb():
        fwd().backward(grad)

    def timed(fn, **bench_kw):
        fn()
        return triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median", **bench_kw)

    rows = []
    for kernel, configs in (("fwd", fwd_all), ("dkv", dkv_all), ("dq", dq_all)):
        for c in configs:
            for near in nears:
                if near > c.kwargs["BLOCK_M" if kernel == "dkv" else "BLOCK_N"]:
                    continue
                at._fwd_kernel.configs = [c if kernel == "fwd" else fwd_all[0]]
                at._dkv_kernel.configs = [c if kernel == "dkv" else dkv_all[0]]
                at._dq_kernel.configs = [c if kernel == "dq" else dq_all[0]]
                at.NEAR.update(fwd=16, dkv=16, dq=16)
                at.NEAR[kernel] = near
                try:
                    ms = timed(fwd) if kernel == "fwd" else timed(fb, grad_to_none=[q, k, v, table])
                except Exception as e:  # a config that does not compile or fit: reported, the sweep goes on
                    ms = f"failed: {type(e).__name__}: {str(e)[:120]}"
                row = dict(L=length, causal=causal, kernel=kernel, config=cfg_str(c), near=near, ms=ms)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--lengths", default="512,1024,4096")
    ap.add_argument("--nears", default="16,32,64")
    ap.add_argument("--rep", type=int, default=20)
    args = ap.parse_args()
    at.set_variant("table")
    fwd_all, dkv_all, dq_all = list(at._FWD_CONFIGS), list(at._DKV_CONFIGS), list(at._DQ_CONFIGS)
    nears = [int(x) for x in args.nears.split(",")]
    cells = [(int(x), False) for x in args.lengths.split(",")] + [(1024, True)]
    rows = []
    for length, causal in cells:
        rows += sweep_cell(length, causal, nears, args.rep, fwd_all, dkv_all, dq_all)
        torch.cuda.empty_cache()
    best = {}
    for r in rows:
        if isinstance(r["ms"], float):
            key = f"{r['L']}{'c' if r['causal'] else ''}/{r['kernel']}"
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    print(json.dumps(best, indent=1))
    os.makedirs(args.out, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    path = os.path.join(args.out, f"attention_near_sweep_{datetime.date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows, "best": best}, f, indent=1)


if __name__ == "__main__":
    main()
