"""Registers and spills of the T5 ("table") attention forward for sm_90a, near bias by TMA or by pointers.

Compiles, without a GPU, every autotune config of ``_fwd_kernel`` with the near-diagonal bias tile loaded
through an in-kernel tensor descriptor (``attention_triton.TMA``) and through per-element pointers, at
near-step widths 32 and 64 (``NEAR["fwd"]``), and reports ptxas registers and spill bytes (the compile-only
driver of ``attention_registers.py``), shared memory, and the TMA copies in the PTX (``cp.async.bulk.tensor``:
a 64-column fp32 tile is copied as two 32-column boxes, and the loop pipeline issues copies ahead). Run on a
CPU machine (TRITON_INTERPRET unset): `.venv/bin/python benchmarks/attention_tma_check.py`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_registers import compile_only, compiled, ptxas_report  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--near", default="32,64", help="near-step widths of the forward")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--tma", default="off,on", help="near bias by pointers (off) and/or by TMA (on)")
    args = p.parse_args()
    compile_only()
    from fat5.ops import attention_triton as A

    A.set_variant("table")
    print(
        "| head dim | causal | config | near | TMA | registers | spill bytes | shared bytes | TMA copies in PTX |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    failed = []
    for d in map(int, args.head_dims.split(",")):
        for causal in (False, True):
            for near in map(int, args.near.split(",")):
                for tma in (x == "on" for x in args.tma.split(",")):
                    A.NEAR["fwd"] = near
                    A.TMA = tma
                    compiled.clear()
                    q = torch.randn(1, 2, args.length, d, dtype=torch.bfloat16)
                    rel = torch.randn(32, 2)
                    try:
                        A.flash_attention(q, q, q, causal=causal, rel_table=rel, rel_bidirectional=not causal)
                    except Exception as e:  # a kernel that does not compile is the finding
                        failed.append(f"d{d} causal={causal} near={near} tma={tma}: {type(e).__name__}: {e}")
                        continue
                    for name, kw, kernel in compiled:
                        if name != "_fwd_kernel":
                            continue
                        ptx = kernel.asm["ptx"]
                        regs, spill = ptxas_report(ptx)
                        md = kernel.metadata
                        cfg = f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{md.num_warps} s{md.num_stages}"
                        bulk = ptx.count("cp.async.bulk.tensor")
                        step = min(near, kw["BLOCK_N"])
                        row = (d, causal, cfg, step, tma, regs, spill, md.shared, bulk)
                        print(f"| {' | '.join(map(str, row))} |", flush=True)
    for f in failed:
        print("FAILED:", f)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
