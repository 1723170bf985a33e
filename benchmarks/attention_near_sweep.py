"""Sweep of the attention kernels' tile configs and near-diagonal step widths (at.NEAR), T5 bias, one GPU.

Each kernel is timed with one config at a time (its autotuner reduced to that config), the other two kernels
held at a fixed config: the forward alone; dk/dv and dq by the forward+backward time (median of do_bench).
Setting as bench_attention: bf16, 12 heads x 64, B*L = 32768, T5 buckets 32 / max distance 128.
Prints one JSON line per measurement (also appended, as it goes, to attention_near_sweep_<date><tag>.jsonl) and
writes attention_near_sweep_<date><tag>.json. ``--kernels fwd`` sweeps the forward alone; ``--extra-fwd`` adds
configs outside the autotuner's list (``128x64w8s3``, ``r128`` for maxnreg 128, ``n64`` for the config's own
near width; ``--only-extra`` sweeps them alone); ``--head-dim`` changes the head dim; each cell also times SDPA
without bias (the ceiling of the targets) in the same process.
Run from the repository root on a CUDA machine: `PYTHONPATH=src python3 benchmarks/attention_near_sweep.py`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re

import torch
import triton
import triton.testing

from fat5.ops import attention_triton as at

H, D, TOKENS = 12, 64, 32768


def inputs(length, d=D):
    g = torch.Generator(device="cuda").manual_seed(0)
    b = TOKENS // length
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = (mk(b, H, length, d).requires_grad_(True) for _ in range(3))
    table = torch.randn(32, H, device="cuda", generator=g).requires_grad_(True)
    return q, k, v, table


def cfg_str(c):
    regs = f"r{c.maxnreg}" if c.maxnreg else ""
    near = f"n{c.kwargs['NEAR_CFG']}" if c.kwargs.get("NEAR_CFG") else ""  # its own near width
    return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}{regs}{near}"


def parse_cfg(text):
    m = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)(?:r(\d+))?(?:n(\d+))?", text.strip())
    if not m:
        raise SystemExit(
            f"--extra-fwd: {text!r} is not a config like 128x64w8s3, 128x64w8s3r128 or 128x64w8s3r128n64"
        )
    bm, bn, w, st, r, n = m.groups()
    return at._cfg(int(bm), int(bn), int(w), int(st), int(r) if r else None, near=int(n) if n else None)


def sweep_cell(length, causal, nears, rep, fwd_all, dkv_all, dq_all, kernels, log, d=D):
    q, k, v, table = inputs(length, d)
    grad = torch.randn_like(q)
    kw = dict(causal=causal, rel_table=table, rel_bidirectional=not causal, rel_max_distance=128)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731

    def fwd():
        return at.flash_attention(q, k, v, **kw)

    def fb():
        fwd().backward(grad)

    def timed(fn, **bench_kw):
        fn()
        return triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median", **bench_kw)

    rows = []
    with torch.no_grad():
        row = dict(L=length, causal=causal, d=d, kernel="sdpa_fwd", config="-", near=0, ms=timed(sdpa))
    rows.append(row)
    print(json.dumps(row), flush=True)
    log.write(json.dumps(row) + "\n")
    for kernel, configs in (("fwd", fwd_all), ("dkv", dkv_all), ("dq", dq_all)):
        if kernel not in kernels:
            continue
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
                row = dict(L=length, causal=causal, d=d, kernel=kernel, config=cfg_str(c), near=near, ms=ms)
                rows.append(row)
                print(json.dumps(row), flush=True)
                log.write(json.dumps(row) + "\n")
                log.flush()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--lengths", default="512,1024,4096")
    ap.add_argument("--nears", default="16,32,64")
    ap.add_argument("--rep", type=int, default=20)
    ap.add_argument("--causal-lengths", default="1024")
    ap.add_argument("--kernels", default="fwd,dkv,dq")
    ap.add_argument("--extra-fwd", default="", help="forward configs to add, e.g. 128x64w8s4,64x64w4s2")
    ap.add_argument("--only-extra", action="store_true", help="sweep the --extra-fwd configs alone")
    ap.add_argument("--head-dim", type=int, default=D)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    at.set_variant("table")
    fwd_all, dkv_all, dq_all = list(at._FWD_CONFIGS), list(at._DKV_CONFIGS), list(at._DQ_CONFIGS)
    extra = [parse_cfg(x) for x in args.extra_fwd.split(",") if x.strip()]
    if args.only_extra and not extra:
        ap.error("--only-extra needs --extra-fwd")
    fwd_all = extra if args.only_extra else fwd_all + extra
    kernels = args.kernels.split(",")
    nears = [int(x) for x in args.nears.split(",")]
    cells = [(int(x), False) for x in args.lengths.split(",") if x] + [
        (int(x), True) for x in args.causal_lengths.split(",") if x
    ]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"attention_near_sweep_{datetime.date.today().isoformat()}{args.tag}")
    rows = []
    with open(stem + ".jsonl", "a") as log:
        for length, causal in cells:
            rows += sweep_cell(
                length, causal, nears, args.rep, fwd_all, dkv_all, dq_all, kernels, log, args.head_dim
            )
            torch.cuda.empty_cache()
    best = {}
    for r in rows:
        if isinstance(r["ms"], float):
            key = f"{r['L']}{'c' if r['causal'] else ''}/{r['kernel']}"
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    print(json.dumps(best, indent=1))
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    meta["commit"] = os.environ.get("FAT5_COMMIT", "")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "best": best}, f, indent=1)


if __name__ == "__main__":
    main()
