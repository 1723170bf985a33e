"""What an RMSNorm fwd+bwd puts in a CUDA graph: the same step captured through autograd (as a model calls it)
and as the direct forward/backward op pair, each timed by replay and dumped as a Graphviz file (the driver's debug
print: node kinds, kernel names, and the edges between them, programmatic ones included); with and without
programmatic dependent launches.

    PYTHONPATH=src python3 benchmarks/rmsnorm_graph.py --out OUT_DIR [--widths 512,1024]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os

import torch
from triton.testing import do_bench_cudagraph

from fat5.ops import rmsnorm as rn

TOKENS = 32768


def _dot_print(graph: torch.cuda.CUDAGraph, path: str) -> None:
    """The captured graph written as Graphviz by the driver (cuGraphDebugDotPrint, every debug flag): node
    kinds, kernel names and launch attributes, and each edge's type (programmatic ones included). Needs a
    graph kept after capture (``keep_graph=True``)."""
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuGraphDebugDotPrint.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint]
    rc = lib.cuGraphDebugDotPrint(ctypes.c_void_p(graph.raw_cuda_graph()), path.encode(), 1)
    if rc != 0:
        raise RuntimeError(f"cuGraphDebugDotPrint returned {rc}")


def capture(fn, path: str) -> None:
    """``fn`` captured once (after a warm-up on a side stream), its graph dumped to ``path``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(g):
        fn()
    _dot_print(g, path)


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

        def direct_kept(x=x, w=w, dy=dy):  # as direct, but y lives through the backward as under autograd
            y, _, rstd = rn._rms_norm_fwd(x, w, None, 1e-6, None)
            rn._rms_norm_bwd(dy, None, x, w, rstd, None)
            return y

        def eager_pair(x=x, w=w, dy=dy):  # the implementations themselves, no dispatch layer
            _, _, rstd = rn._rms_norm_fwd_impl(x, w, None, 1e-6, None)
            rn._rms_norm_bwd_impl(dy, None, x, w, rstd, None)

        # direct_kept: whether the direct pair's lead comes from its backward writing dx over the freed y
        paths = (
            ("autograd", autograd_step),
            ("direct", direct_pair),
            ("direct_kept", direct_kept),
            ("impl", eager_pair),
        )
        for pdl in (True, False):  # the launches as programmatic dependents (the default), then without
            for name, fn in paths:
                tag = name if pdl else f"{name}_nopdl"
                rn.TUNE["pdl"] = pdl
                try:
                    path = os.path.join(args.out, f"rmsnorm_graph_d{d}_{tag}.dot")
                    try:
                        capture(fn, path)
                        nodes = summary(path)
                    except Exception as e:  # the dump is a diagnostic: its timing stands without it
                        nodes = f"no dump: {type(e).__name__}: {str(e)[:200]}"
                    us = 1e3 * do_bench_cudagraph(fn, rep=100, return_mode="median")
                finally:
                    rn.TUNE.pop("pdl", None)
                row = dict(d=d, path=tag, us=round(us, 2), nodes=nodes)
                rows.append(row)
                print(json.dumps(row, indent=1), flush=True)
    with open(os.path.join(args.out, "rmsnorm_graph.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
