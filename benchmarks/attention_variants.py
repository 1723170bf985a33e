"""Quick A/B of the attention kernel's T5-bias inner-loop variants on a GPU (bench_attention setting: bf16,
12 heads x 64, B*L = 32768, T5 buckets 32 / 128): fwd and fwd+bwd TFLOP/s per variant, and each variant's
output and gradients against the default variant's (they compute the same function).

    FAT5_ATTN_AUTOTUNE=0 PYTHONPATH=src python3 benchmarks/attention_variants.py   # first config only: fast
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from fat5.ops import attention_triton as at  # noqa: E402

H, BUCKETS, MAXDIST, TOKENS = 12, 32, 128, 32768


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="split,table")
    ap.add_argument("--cells", default="4096:0,1024:1", help="L:causal pairs")
    ap.add_argument("--rep", type=int, default=20)
    args = ap.parse_args()
    for cell in args.cells.split(","):
        length, causal = int(cell.split(":")[0]), cell.split(":")[1] == "1"
        b = TOKENS // length
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(b, H, length, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in "qkv"
        )
        q = q * 0.1
        table = torch.randn(BUCKETS, H, device="cuda", generator=g) * 0.5
        do = torch.randn_like(q)
        flops = 4 * b * H * length * length * 64 / (2 if causal else 1)
        ref = None
        for variant in args.variants.split(","):
            at.set_variant(variant)
            leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, table)]

            def fwd(leaves=leaves, causal=causal):
                return at.flash_attention(
                    *leaves[:3], causal=causal, rel_table=leaves[3], rel_bidirectional=not causal
                )

            out = fwd()
            grads = torch.autograd.grad(out, leaves, do)
            res = (out, *grads)
            err = None
            if ref is None:
                ref = res
            else:
                err = [
                    float((x.float() - y.float()).abs().max() / y.float().abs().max())
                    for x, y in zip(res, ref)
                ]
            t_f = triton.testing.do_bench(fwd, warmup=5, rep=args.rep, return_mode="median")
            t_fb = triton.testing.do_bench(
                lambda fwd=fwd, do=do: fwd().backward(do),
                warmup=5,
                rep=args.rep,
                grad_to_none=leaves,
                return_mode="median",
            )
            row = dict(
                L=length, causal=causal, variant=variant, fwd_ms=round(t_f, 4), fwdbwd_ms=round(t_fb, 4),
                fwd_tflops=round(flops / t_f / 1e9, 1), fwdbwd_tflops=round(3.5 * flops / t_fb / 1e9, 1),
                rel_err_vs_first=err,
            )  # fmt: skip
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
