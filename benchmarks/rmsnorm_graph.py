"""What an RMSNorm fwd+bwd puts in a CUDA graph: the same step captured through autograd (as a model calls it)
and as the direct forward/backward op pair, each timed by replay and dumped as a Graphviz file (CUDA's debug
print: node kinds, kernel names, and the edges between them, programmatic ones included).

    PYTHONPATH=src python3 benchmarks/rmsnorm_graph.py --out OUT_DIR [--widths 512,1024]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from triton.testing import do_bench_cudagraph

from fat5.ops import rmsnorm as rn

TOKENS = 32768


def capture(fn, path: str) -> torch.cuda.CUDAGraph:
    """``fn`` captured once (after a warm-up on a side stream), its graph dumped to ``path``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    g.enable_debug_mode()
    with torch.cuda.graph(g):
        fn()
    g.debug_dump(path)
    return g


def summary(path: str) -> list[str]:
    """The node labels of a dumped graph, one line each (kernel names cut short), and its edges."""
    lines = []
    for line in open(path):
        if "->" in line or ("label=" in line and any(k in line for k in ("KERNEL", "MEM", "EVENT", "EMPTY"))):
            lines.append(line.strip()[:300])
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--widths", default="512,1024")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for d in map(int, args.widths.split(",")):
        x = torch.randn(TOKENS, d, device="cuda", dtype=torch.bfloat16)
        w = (1 + 0.1 * torch.randn(d, device="cuda")).to(torch.bfloat16)
        dy = torch.randn_like(x)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

        def autograd_step(xg=xg, wg=wg, dy=dy):
            y = rn.rms_norm_triton(xg, wg, 1e-6)
            torch.autograd.grad(y, [xg, wg], dy)

        def direct_pair(x=x, w=w, dy=dy):
            _, _, rstd = rn._rms_norm_fwd(x, w, None, 1e-6, None)
            rn._rms_norm_bwd(dy, None, x, w, rstd, None)

        def eager_pair(x=x, w=w, dy=dy):  # the implementations themselves, no dispatch layer
            _, _, rstd = rn._rms_norm_fwd_impl(x, w, None, 1e-6, None)
            rn._rms_norm_bwd_impl(dy, None, x, w, rstd, None)

        for name, fn in (("autograd", autograd_step), ("direct", direct_pair), ("impl", eager_pair)):
            path = os.path.join(args.out, f"rmsnorm_graph_d{d}_{name}.dot")
            capture(fn, path)
            us = 1e3 * do_bench_cudagraph(fn, rep=100, return_mode="median")
            # some torch builds capture in debug mode but write no dump: the timing still stands
            nodes = summary(path) if os.path.exists(path) else "debug_dump wrote no file"
            row = dict(d=d, path=name, us=round(us, 2), nodes=nodes)
            rows.append(row)
            print(json.dumps(row, indent=1), flush=True)
    with open(os.path.join(args.out, "rmsnorm_graph.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
