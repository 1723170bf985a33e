"""RMSNorm kernels compiled for sm_90a without a GPU: registers, spills, shared memory, the tile layout Triton
chose, and the barriers and warp shuffles inside the backward's row loop, for the row-chunk layouts
(``fat5.ops.rmsnorm.TUNE["chunk"]``) at the benchmark's widths. A row sum that crosses warps shows up as an
extra barrier per tile. Run on a CPU machine (TRITON_INTERPRET unset):

    .venv/bin/python benchmarks/rmsnorm_registers.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from attention_registers import compile_only, ptxas_report  # noqa: E402

TOKENS = 32768


def loop_counts(ptx: str) -> tuple[int, int]:
    """(bar.sync, shfl) inside the first loop of the PTX (between its header label and its back branch)."""
    lines = ptx.splitlines()
    start = next((i for i, s in enumerate(lines) if "Loop Header" in s), None)
    if start is None:
        return -1, -1
    label = lines[start].split(":")[0].strip()
    end = next(
        i for i in range(start + 1, len(lines)) if re.search(rf"bra(\.uni)?\s+{re.escape(label)};", lines[i])
    )
    body = lines[start:end]
    return sum("bar.sync" in s for s in body), sum("shfl.sync" in s for s in body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--widths", default="512,768,1024,4096")
    ap.add_argument("--chunks", default="0,128,256", help="row chunks (0: the whole row, the default)")
    args = ap.parse_args()
    compile_only()
    from fat5.ops import rmsnorm as rn

    rows = []
    for n in map(int, args.widths.split(",")):
        x = torch.empty(TOKENS, n, dtype=torch.bfloat16)
        w = torch.empty(n, dtype=torch.bfloat16)
        rstd = torch.empty(TOKENS)
        bm, bn, warps, per_sm, stages = rn._bwd_tile(n, 4)
        fbm, _, fwarps = rn._tile(n)
        for chunk in (int(c) or bn for c in args.chunks.split(",")):
            chunk = min(chunk, bn)
            k = rn._rms_norm_bwd_kernel.warmup(
                x, x, x, w, rstd, x, x, torch.empty(264, n), w, torch.empty(17, n),
                torch.empty(18, dtype=torch.int32), TOKENS, n, ROWS_PER_PROGRAM=128, HAS_DRES=False,
                HAS_DXL=False, BLOCK_M=bm, BLOCK_N=bn, CHUNK=chunk, STAGES=stages, num_warps=warps, grid=(1,),
            )  # fmt: skip
            regs, spill = ptxas_report(k.asm["ptx"])
            bars, shfl = loop_counts(k.asm["ptx"])
            layout = re.findall(r"#blocked\d* = #ttg.blocked<\{(.*?)\}>", k.asm["ttgir"])
            kf = rn._rms_norm_fwd_kernel.warmup(
                x, x, x, x, w, rstd, TOKENS, n, 1e-6, HAS_RES=False, BLOCK_M=fbm, BLOCK_N=bn,
                CHUNK=min(chunk, bn), num_warps=fwarps, grid=(1,),
            )  # fmt: skip
            fregs, fspill = ptxas_report(kf.asm["ptx"])
            row = dict(
                d=n, chunk=chunk, bwd_block_m=bm, bwd_warps=warps, bwd_regs=regs, bwd_spill=spill,
                bwd_smem=k.metadata.shared, bwd_loop_barriers=bars, bwd_loop_shuffles=shfl,
                bwd_layouts=layout, fwd_block_m=fbm, fwd_warps=fwarps, fwd_regs=fregs, fwd_spill=fspill,
                fwd_barriers=kf.asm["ptx"].count("bar.sync"),
            )  # fmt: skip
            rows.append(row)
            print(json.dumps({k_: v for k_, v in row.items() if k_ != "bwd_layouts"}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"rmsnorm_registers_{datetime.date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump({"target": "sm_90a (offline ptxas)", "rows": rows}, f, indent=1)
    print(path)


if __name__ == "__main__":
    main()
