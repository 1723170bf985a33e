"""One RMSNorm forward+backward at 32768 tokens x d (bf16), for Nsight Compute to profile its kernels.

    ncu --clock-control none --kernel-name regex:rms_norm --launch-skip 4 --launch-count 2 \
        --section SpeedOfLight --section WarpStateStats --section Occupancy \
        python3 benchmarks/rmsnorm_ncu.py --d 512

The first calls (warm-up and compilation) are what --launch-skip passes over.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from fat5.ops import rmsnorm as rn  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    x = torch.randn(args.tokens, args.d, device="cuda", dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(args.d, device="cuda")).to(torch.bfloat16)
    dy = torch.randn_like(x)
    for _ in range(args.calls):
        _, _, rstd = rn._rms_norm_fwd_impl(x, w, None, 1e-6, None)
        rn._rms_norm_bwd_impl(dy, None, x, w, rstd, None)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
