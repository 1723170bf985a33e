"""RMSNorm tile sweep: GPU time (CUDA-graph replay) of the forward kernel, the backward kernel and the weight-
gradient reduction on their own, for several tile shapes, at 32768 tokens x d in {512, 768, 1024, 4096} bf16.

Picks the defaults of ``fat5.ops.rmsnorm._tile`` / ``_num_programs`` from measurements instead of guesses.

    PYTHONPATH=src python3 benchmarks/rmsnorm_sweep.py --out OUT_DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from fat5.ops import rmsnorm as rn

TOKENS = 32768


BASE: dict = {}  # TUNE entries every measurement keeps (--tma, --base)


def reset():
    rn.TUNE.clear()
    rn.TUNE.update(BASE)


def in_turn(*fns):
    """One callable running ``fns`` one after the other (a pair of ops timed as one graph)."""

    def run():
        for fn in fns:
            fn()

    return run


def graph_us(fn):
    fn()
    return 1e3 * do_bench_cudagraph(fn, rep=50, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--widths", default="512,768,1024,4096")
    ap.add_argument(
        "--kinds",
        default="fwd,bwd",
        help="which kernels to sweep (fwd, bwd, reduce; step: the autograd step per backward tile; default: the shipped tiles; parts: each kernel of a fwd+bwd alone, and torch copy / add of the same bytes)",
    )
    ap.add_argument("--stages", default="3", help="backward loop pipelining depths to sweep")
    ap.add_argument(
        "--chunks",
        default="0",
        help="row chunks to sweep, forward and backward (columns; 0: the whole row, the default layout)",
    )
    ap.add_argument("--per-sm", default="1,2,4,8", help="backward programs per SM to sweep")
    ap.add_argument("--block-m", default="1,2,4,8", help="backward rows per tile to sweep")
    ap.add_argument("--warps", default="4,8", help="backward warps per program to sweep")
    ap.add_argument(
        "--mixed",
        action="store_true",
        help="the model's case under bf16 autocast: bf16 x onto an fp32 residual, bf16 normed output",
    )
    ap.add_argument(
        "--reduce-tiles",
        default="auto,256x16,512x8,512x16,128x32,fused",
        help="dweight reduction tiles (BLOCK_RxBLOCK_N; fused: summed in the backward kernel) timed with the "
        "backward (--kinds reduce)",
    )
    ap.add_argument(
        "--layouts",
        default="band",
        help="backward row layouts to sweep (band: a contiguous band of rows per program; strided: every "
        "nprog-th tile); with --kinds parts, each layout's backward, fwd+bwd and autograd step",
    )
    ap.add_argument(
        "--prefetch", default="2", help="backward tiles asked of L2 before the PDL wait (--kinds step)"
    )
    ap.add_argument("--tag", default="", help="suffix of the report's file name")
    ap.add_argument("--tma", action="store_true", help="backward tiles loaded by tensor descriptors")
    ap.add_argument(
        "--base",
        default="{}",
        help='TUNE entries every measurement keeps, as JSON (e.g. \'{"even_bands": true, "maxnreg": 168}\')',
    )
    args = ap.parse_args()
    BASE.update(json.loads(args.base))
    if args.tma:
        BASE["tma"] = True
    x0 = torch.randn(2**28, device="cuda", dtype=torch.bfloat16)
    y0 = torch.empty_like(x0)
    copy_gbs = 2 * x0.numel() * 2 / do_bench(lambda: y0.copy_(x0), rep=100, return_mode="median") / 1e6
    print(f"copy {copy_gbs:.0f} GB/s")
    rows = []
    for d in (int(s) for s in args.widths.split(",")):
        x = torch.randn(TOKENS, d, device="cuda", dtype=torch.bfloat16)
        w = (1 + 0.1 * torch.randn(d, device="cuda")).to(torch.bfloat16)
        dy = torch.randn_like(x)
        bn = triton.next_power_of_2(d)
        ideal_fwd = 2 * x.numel() * 2 / copy_gbs / 1e3  # us
        ideal_bwd = 3 * x.numel() * 2 / copy_gbs / 1e3
        reset()
        # mixed: fwd reads x (2 B) + r (4 B), writes h (4 B) + y (2 B); bwd reads dy (2), dh (4), h (4), writes
        # dh (4) + its bf16 copy (2); otherwise bf16 x -> y and dy, x -> dx
        res = torch.randn(TOKENS, d, device="cuda") if args.mixed else None
        out_dtype = torch.bfloat16 if args.mixed else None
        if args.mixed:
            ideal_fwd = 12 * x.numel() / copy_gbs / 1e3
            ideal_bwd = 16 * x.numel() / copy_gbs / 1e3
        _, h, rstd = rn._rms_norm_fwd(x, w, res, 1e-6, out_dtype)
        h = h if args.mixed else x
        dres = torch.randn_like(h) if args.mixed else None
        low = torch.bfloat16 if args.mixed else None
        best = {}
        if (
            "default" in args.kinds
        ):  # the shipped tiles, each kernel timed on its own (bwd: with the reduction)
            reset()
            f_us = graph_us(lambda x=x, w=w, r=res, o=out_dtype: rn._rms_norm_fwd(x, w, r, 1e-6, o))
            b_us = graph_us(
                lambda dy=dy, h=h, w=w, rstd=rstd, dr=dres, lo=low: rn._rms_norm_bwd(dy, dr, h, w, rstd, lo)
            )
            r = dict(
                d=d, kind="default", fwd_us=round(f_us, 2), bwd_us=round(b_us, 2),
                fwd_pct=round(100 * ideal_fwd / f_us), bwd_pct=round(100 * ideal_bwd / b_us),
            )  # fmt: skip
            rows.append(r)
            print(json.dumps(r), flush=True)
        if "parts" in args.kinds:
            # where a fwd+bwd's time goes: each kernel alone, the backward without its dweight reduction, the
            # reduction alone, and torch's own streaming kernels moving the same bytes (copy as the forward,
            # add as the backward)
            reset()
            parts = {}
            fwd = lambda x=x, w=w, r=res, o=out_dtype: rn._rms_norm_fwd(x, w, r, 1e-6, o)  # noqa: E731
            bwd = lambda dy=dy, h=h, w=w, rstd=rstd, dr=dres, lo=low: rn._rms_norm_bwd(dy, dr, h, w, rstd, lo)  # noqa: E731

            parts["fwd"] = graph_us(fwd)
            parts["bwd"] = graph_us(bwd)
            parts["fwd_bwd"] = graph_us(in_turn(fwd, bwd))
            rn.TUNE["no_reduce"] = True
            parts["bwd_no_reduce"] = graph_us(bwd)
            reset()
            progs = rn._num_programs(x.device)
            progs = triton.cdiv(TOKENS, max(8, triton.next_power_of_2(triton.cdiv(TOKENS, progs))))
            part = torch.randn(progs, d, device="cuda")
            br, bc = rn._reduce_tile(progs)
            dwo = torch.empty_like(w)
            parts["reduce"] = graph_us(
                lambda part=part, dwo=dwo, progs=progs, d=d, br=br, bc=bc: rn._sum_rows_kernel[
                    (triton.cdiv(d, bc),)
                ](part, dwo, progs, d, BLOCK_R=br, BLOCK_N=bc)
            )
            # the same fwd+bwd through autograd (as a model calls it), and the kernels it runs
            # (mixed: bf16 x onto the fp32 residual, bf16 output; the gradients of the output and of the new
            # residual flow back, as in the model)
            xg = x.detach().requires_grad_()
            wg = w.detach().requires_grad_()
            rg = res.detach().requires_grad_() if args.mixed else None

            def step(xg=xg, wg=wg, rg=rg, dy=dy, dres=dres):
                if rg is None:
                    torch.autograd.grad(rn.rms_norm_triton(xg, wg, 1e-6), [xg, wg], dy)
                else:
                    y, hn = rn.rms_norm_triton(xg, wg, 1e-6, rg, torch.bfloat16)
                    torch.autograd.grad([y, hn], [xg, wg, rg], [dy, dres])

            parts["autograd_step"] = graph_us(step)
            # the backward's row layouts (TUNE["strided"]) side by side
            for layout in args.layouts.split(","):
                rn.TUNE["strided"] = layout == "strided"
                parts[f"bwd_{layout}"] = graph_us(bwd)
                parts[f"fwd_bwd_{layout}"] = graph_us(in_turn(fwd, bwd))
                parts[f"autograd_step_{layout}"] = graph_us(step)
                rn.TUNE["no_reduce"] = True
                parts[f"bwd_no_reduce_{layout}"] = graph_us(bwd)
                reset()

            # the direct pair with the forward's output alive while the backward runs, as autograd keeps it: when
            # the pair frees it first, dx may be allocated onto y's lines while they still sit dirty in L2
            def pair_kept(fwd=fwd, bwd=bwd):
                out = fwd()
                bwd()
                return out

            parts["fwd_bwd_kept"] = graph_us(pair_kept)
            # the same two without programmatic dependent launches: if autograd's step costs what the direct pair
            # costs without them, the gap between the two is the forward -> backward launch overlap it loses
            rn.TUNE["pdl"] = False
            parts["fwd_bwd_nopdl"] = graph_us(in_turn(fwd, bwd))
            parts["autograd_step_nopdl"] = graph_us(step)
            reset()
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            kernels = [e.name[:40] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            print(f"d={d} autograd step kernels: {kernels}", flush=True)
            ys, zs = torch.empty_like(x), torch.empty_like(x)
            copy = lambda x=x, ys=ys: ys.copy_(x)  # noqa: E731
            add = lambda x=x, dy=dy, zs=zs: torch.add(x, dy, out=zs)  # noqa: E731

            parts["torch_copy"] = graph_us(copy)
            parts["torch_add"] = graph_us(add)
            parts["torch_copy_add"] = graph_us(in_turn(copy, add))
            r = dict(d=d, kind="parts", ideal_fwd_us=round(ideal_fwd, 2), ideal_bwd_us=round(ideal_bwd, 2))
            r.update({k: round(v, 2) for k, v in parts.items()})
            rows.append(r)
            print(json.dumps(r), flush=True)
        fwd_sweep = [
            (bm, nw, ch)
            for ch in map(int, args.chunks.split(","))
            for bm in (1, 2, 4, 8, 16)
            for nw in (2, 4, 8)
            if 512 <= bm * bn <= 32768 and nw * 32 * 4 <= bm * bn * 2 and nw * 32 <= bm * bn
        ]
        for bm, nw, ch in fwd_sweep if "fwd" in args.kinds else ():
            reset()
            rn.TUNE["fwd"] = (bm, nw)
            if ch:
                rn.TUNE["fwd_chunk"] = ch
            us = graph_us(lambda x=x, w=w, r=res, o=out_dtype: rn._rms_norm_fwd(x, w, r, 1e-6, o))
            r = dict(
                d=d, kind="fwd", block_m=bm, warps=nw, chunk=ch, us=round(us, 2),
                pct=round(100 * ideal_fwd / us),
            )  # fmt: skip
            rows.append(r)
            print(json.dumps(r), flush=True)
            if us < best.get("fwd", (1e9,))[0]:
                best["fwd"] = (us, bm, nw, ch)
        sweep = [
            (st, per_sm, bm, nw, ch, lay)
            for lay in args.layouts.split(",")
            for ch in map(int, args.chunks.split(","))
            for st in map(int, args.stages.split(","))
            for per_sm in map(int, args.per_sm.split(","))
            for bm in map(int, args.block_m.split(","))
            for nw in map(int, args.warps.split(","))
            if bm * bn <= 16384 and nw * 32 <= bm * bn and nw * 32 * 8 <= bm * bn * 4
        ]
        # the backward's tiles timed where the targets time them: the whole autograd step (forward, backward,
        # dweight sum), for each tile and each count of tiles asked of L2 before the PDL wait (--prefetch)
        xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
        step_sweep = [(cfg, pf) for cfg in sweep for pf in map(int, args.prefetch.split(","))]
        for (st, per_sm, bm, nw, ch, lay), pf in (
            step_sweep if "step" in args.kinds and not args.mixed else ()
        ):
            reset()
            rn.TUNE.update(strided=lay == "strided", bwd=(bm, nw, per_sm), stages=st, prefetch=pf)
            if ch:
                rn.TUNE["chunk"] = ch
            us = graph_us(
                lambda xg=xg, wg=wg, dy=dy: torch.autograd.grad(
                    rn.rms_norm_triton(xg, wg, 1e-6), [xg, wg], dy
                )
            )
            r = dict(
                d=d, kind="step", layout=lay, stages=st, per_sm=per_sm, block_m=bm, warps=nw, chunk=ch, prefetch=pf,
                us=round(us, 2), pct=round(100 * (ideal_fwd + ideal_bwd) / us),
            )  # fmt: skip
            rows.append(r)
            print(json.dumps(r), flush=True)
            if us < best.get("step", (1e9,))[0]:
                best["step"] = (us, bm, nw, per_sm, st, ch, lay, pf)
        for st, per_sm, bm, nw, ch, lay in sweep if "bwd" in args.kinds else ():
            reset()
            rn.TUNE["strided"] = lay == "strided"
            rn.TUNE["bwd"] = (bm, nw, per_sm)
            rn.TUNE["stages"] = st
            if ch:
                rn.TUNE["chunk"] = ch
            us = graph_us(
                lambda dy=dy, h=h, w=w, rstd=rstd, dr=dres, lo=low: rn._rms_norm_bwd(dy, dr, h, w, rstd, lo)
            )
            r = dict(
                d=d, kind="bwd", layout=lay, stages=st, per_sm=per_sm, block_m=bm, warps=nw, chunk=ch,
                us=round(us, 2), pct=round(100 * ideal_bwd / us),
            )  # fmt: skip
            rows.append(r)
            print(json.dumps(r), flush=True)
            if us < best.get("bwd", (1e9,))[0]:
                best["bwd"] = (us, bm, nw, per_sm, st, ch, lay)
        for per_sm in (1, 2, 4, 8) if "reduce" in args.kinds else ():
            progs = per_sm * torch.cuda.get_device_properties(0).multi_processor_count
            part = torch.randn(progs, d, device="cuda")
            br, bc = rn._reduce_tile(progs)
            us = graph_us(
                lambda part=part, w=w, progs=progs, d=d, br=br, bc=bc: rn._sum_rows_kernel[
                    (triton.cdiv(d, bc),)
                ](part, w, progs, d, BLOCK_R=br, BLOCK_N=bc)
            )
            r = dict(d=d, kind="dw_reduce", per_sm=per_sm, us=round(us, 2))
            rows.append(r)
            print(json.dumps(r), flush=True)
        # the whole backward (its kernel, then the reduction as a programmatic dependent) per reduction tile
        for tile in args.reduce_tiles.split(",") if "reduce" in args.kinds else ():
            reset()
            if tile == "fused":
                rn.TUNE["fused_reduce"] = True
            elif tile != "auto":
                rn.TUNE["reduce"] = tuple(int(v) for v in tile.split("x"))
            us = graph_us(
                lambda dy=dy, h=h, w=w, rstd=rstd, dr=dres, lo=low: rn._rms_norm_bwd(dy, dr, h, w, rstd, lo)
            )
            r = dict(d=d, kind="bwd_reduce_tile", tile=tile, us=round(us, 2))
            rows.append(r)
            print(json.dumps(r), flush=True)
        print(f"d={d}: best {best}; ideal fwd {ideal_fwd:.1f} us, bwd {ideal_bwd:.1f} us", flush=True)
        rows.append(dict(d=d, kind="best", best=best, ideal_fwd_us=ideal_fwd, ideal_bwd_us=ideal_bwd))
    reset()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(
        args.out,
        f"rmsnorm_sweep_{datetime.date.today().isoformat()}{'_mixed' if args.mixed else ''}{args.tag}.json",
    )
    with open(path, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
