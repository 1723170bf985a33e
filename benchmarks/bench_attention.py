"""Attention with a T5 relative-position bias: our Triton kernel vs the strongest alternatives, one process.

Setting: bf16, 12 heads, head dim 64 (and 128 rows), batch*length = 32768 tokens, scale 1.0,
T5 buckets 32 / max distance 128. Methods:
  sdpa        F.scaled_dot_product_attention without bias (the ceiling: flash backend)
  sdpa_bias   SDPA with the (1, H, L, L) bias materialized from the table in each call (gradient to the table)
  flex        torch.compile(flex_attention), score_mod gathering a 1-D table of the bias at every distance
              -(L-1)..L-1 (block mask if causal): its backward's atomic adds into the table spread over 2L-1
              entries per head
  flex_clamped  the same with the table cut at +-max distance (clamped index): 2W+1 entries, so the far pairs'
              gradient adds all land on the two end entries (about 1 TFLOP/s fwd+bwd, 2026-12-02)
  ours        fat5.ops.attention_triton.flash_attention(rel_table=...), default ("table") inner loops
  ours_split  the same with the "split" inner loops (near-diagonal tiles gathered per element)
  ours_kvtma  ours with the forward's keys and values loaded through tensor descriptors (FAT5_ATTN_KV_TMA)
  ours_fp32table  ours with the T5 bias buffer in fp32 (FAT5_ATTN_HALF_TABLE=0; default: fp16 for 16-bit inputs)
  ours_near64 ours with 64-key forward near steps
  ours_nodoc  ours without the document pass for packed documents (FAT5_ATTN_DOC_PASS=0: every block masked by ids)
  ours_circ   ours with the dk/dv near tiles' table gradient skewed circularly (FAT5_ATTN_CIRC_SKEW=1)
  ours_circ64 ours_circ with dk/dv near steps of 64 queries
  ours_defer  ours with the near tiles' table gradient kept per thread until the loop ends (FAT5_ATTN_CIRC_SKEW=2)
  ours_rot    ours_defer through a step-independent gather whose row sums are rotated (FAT5_ATTN_CIRC_SKEW=3,
              the default)
  ours_tma64  ours with the forward's near bias read through a tensor descriptor (TMA), 64 keys a step
              (FAT5_ATTN_TMA=1)
  ours_nofold ours with every tile's scores scaled and biased before the softmax, also where the bias is one
              constant (FAT5_ATTN_FOLD_SCALE=0; default: folded into the exponent's FFMA)
  ours_notail ours with the forward's and dq's masked last steps gathering the bias by distance
              (FAT5_ATTN_TAIL_TABLE=0; the default reads the Toeplitz table)
  ours_nobias our kernel with no bias (not in the default list): the ceiling the bias costs are measured from
TFLOP/s: forward 4*B*H*L*L*D (halved if causal), forward+backward 3.5x that; median of triton.testing.do_bench.
Memory: peak allocated during one forward+backward minus what was allocated before (inputs excluded).
Packed rows: 8 documents totalling L=4096 (segment ids; random lengths, and 8 x 512) vs one document of 4096,
our kernel (each variant), with the tile-count bound of the speedup.

    python benchmarks/bench_attention.py --out benchmarks/results/
    python benchmarks/bench_attention.py --quick --out benchmarks/results/   # a few key rows, both variants
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from fat5.ops import attention_triton as at  # noqa: E402
from fat5.ops.attention_triton import flash_attention, set_variant  # noqa: E402
from fat5.positions import relative_position_bucket  # noqa: E402

H, BUCKETS, MAXDIST, TOKENS = 12, 32, 128, 32768


def make_inputs(b, length, d, causal, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda: torch.randn(
        b, H, length, d, device=device, dtype=torch.bfloat16, generator=g
    ).requires_grad_(True)
    q, k, v = mk(), mk(), mk()
    with torch.no_grad():
        q.mul_(0.1)  # scale 1.0 (T5): keep scores of order one
    table = (torch.randn(BUCKETS, H, device=device, generator=g) * 0.5).requires_grad_(True)
    return q, k, v, table


def fn_sdpa(q, k, v, table, causal, **_):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0)


def fn_sdpa_bias(q, k, v, table, causal, **_):
    length = q.shape[2]
    pos = torch.arange(length, device=q.device)
    rel = pos[None, :] - pos[:, None]
    buckets = relative_position_bucket(rel, not causal, BUCKETS, MAXDIST)
    # as HF T5: an embedding lookup (its backward is a dense scatter, far faster than index_put)
    bias = F.embedding(buckets, table).permute(2, 0, 1).unsqueeze(0).to(q.dtype)  # (1, H, L, L) every call
    if causal:
        bias = bias.masked_fill(rel[None, None] > 0, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


def tile_ratio(doc_lengths, block: int = 128) -> float:
    """How many times fewer block x block tiles hold a (query, key) pair of the same document than for one
    document of the same total length: the speedup skipping every other tile would give at most."""
    bounds = [0]
    for n in doc_lengths:
        bounds.append(bounds[-1] + n)
    total = bounds[-1]
    kept = 0
    for q0 in range(0, total, block):
        for k0 in range(0, total, block):
            q1, k1 = min(q0 + block, total), min(k0 + block, total)
            # some document overlaps both the query rows [q0, q1) and the key columns [k0, k1)
            kept += any(
                max(a, q0) < min(b, q1) and max(a, k0) < min(b, k1) for a, b in zip(bounds, bounds[1:])
            )
    return ((total + block - 1) // block) ** 2 / kept


_FLEX = {}


def _flex_call(q, k, v, rb, block_mask):
    """rb (H, 2L-1): the bias at every distance ki - qi, indexed from -(L-1)."""
    from torch.nn.attention.flex_attention import flex_attention

    off = q.shape[2] - 1

    def score_mod(score, b, h, qi, ki):
        return score + rb[h, ki - qi + off]

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0)


def _flex_call_clamped(q, k, v, rb, block_mask):
    """rb (H, 2W+1): the bias at distances -W..W; farther pairs read the end entries."""
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, qi, ki):
        return score + rb[h, (ki - qi).clamp(-MAXDIST, MAXDIST) + MAXDIST]

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0)


def _flex_block_mask(length, causal, device):
    from torch.nn.attention.flex_attention import create_block_mask

    key = (length, causal)
    if key not in _FLEX:
        bm = None
        if causal:
            bm = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, length, length, device=device)
        _FLEX[key] = bm
    return _FLEX[key]


def _flex_bias_rows(table, causal, reach, device):
    """(H, 2 reach + 1): the table's bias at distances -reach..reach (gradient to the table)."""
    dist = torch.arange(-reach, reach + 1, device=device)
    return table[relative_position_bucket(dist, not causal, BUCKETS, MAXDIST)].t().contiguous()


def fn_flex(q, k, v, table, causal, **_):
    length = q.shape[2]
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(_flex_call, dynamic=False)
    rb = _flex_bias_rows(table, causal, length - 1, q.device)
    return _FLEX["fn"](q, k, v, rb, _flex_block_mask(length, causal, q.device))


def fn_flex_clamped(q, k, v, table, causal, **_):
    if "fn_clamped" not in _FLEX:
        _FLEX["fn_clamped"] = torch.compile(_flex_call_clamped, dynamic=False)
    rb = _flex_bias_rows(table, causal, MAXDIST, q.device)
    return _FLEX["fn_clamped"](q, k, v, rb, _flex_block_mask(q.shape[2], causal, q.device))


def fn_ours(q, k, v, table, causal, seg=None, **_):
    set_variant("table")  # the backward (run before the next method's call) uses the same variant
    return _ours(q, k, v, table, causal, seg)


def fn_ours_split(q, k, v, table, causal, seg=None, **_):
    set_variant("split")
    return _ours(q, k, v, table, causal, seg)


@contextlib.contextmanager
def _settings(overrides):
    """Module settings of fat5.ops.attention_triton overridden inside the block, restored after."""
    old = {name: getattr(at, name) for name in overrides}
    for name, value in overrides.items():
        setattr(at, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(at, name, value)


def _with(**overrides):
    """ours with module settings of fat5.ops.attention_triton overridden, e.g. KV_TMA=True or
    NEAR={..., "fwd": 64}. Some are read by the backward's launches (CIRC_SKEW, NEAR["dkv"] / ["dq"],
    DOC_PASS), which run after the call returns: ``bench`` holds ``fn.overrides`` over the forward and the
    backward alike."""

    def fn(q, k, v, table, causal, seg=None, **_):
        set_variant("table")
        with _settings(overrides):
            return _ours(q, k, v, table, causal, seg)

    fn.overrides = overrides
    return fn


def fn_ours_nobias(q, k, v, table, causal, seg=None, **_):
    """our kernel with no bias at all: the ceiling the T5 bias is measured against"""
    set_variant("table")
    return flash_attention(q, k, v, causal=causal, q_segment_ids=seg, kv_segment_ids=seg)


def _ours(q, k, v, table, causal, seg):
    return flash_attention(
        q,
        k,
        v,
        causal=causal,
        rel_table=table,
        rel_bidirectional=not causal,
        rel_max_distance=MAXDIST,
        q_segment_ids=seg,
        kv_segment_ids=seg,
    )


METHODS = {
    "sdpa": fn_sdpa,
    "sdpa_bias": fn_sdpa_bias,
    "flex": fn_flex,
    "flex_clamped": fn_flex_clamped,
    "ours": fn_ours,
    "ours_split": fn_ours_split,
    "ours_nobias": fn_ours_nobias,
    "ours_kvtma": _with(KV_TMA=True),
    "ours_fp32table": _with(HALF_TABLE=False),
    "ours_near64": _with(NEAR={**at.NEAR, "fwd": 64}),
    "ours_nodoc": _with(DOC_PASS=False),
    "ours_circ": _with(CIRC_SKEW=1),
    "ours_circ64": _with(CIRC_SKEW=1, NEAR={**at.NEAR, "dkv": 64}),
    "ours_defer": _with(CIRC_SKEW=2),
    "ours_rot": _with(CIRC_SKEW=3),
    "ours_tma64": _with(TMA=True, NEAR={**at.NEAR, "fwd": 64}),
    "ours_nofold": _with(FOLD_SCALE=False),
    "ours_notail": _with(TAIL_TABLE=False),
}
OURS = (
    "ours",
    "ours_split",
    "ours_kvtma",
    "ours_fp32table",
    "ours_near64",
    "ours_nodoc",
    "ours_circ",
    "ours_circ64",
    "ours_defer",
    "ours_rot",
    "ours_tma64",
    "ours_nofold",
    "ours_notail",
)  # the T5-bias methods: the packed rows run these
RATIO = (*OURS, "ours_nobias")  # methods whose ratio to SDPA is reported
# --quick: (head dim, L, causal) rows that show the gaps of the 2026-11-29 report, plus the packed row
QUICK_CELLS = [(64, 512, False), (64, 1024, False), (64, 1024, True), (64, 4096, False), (64, 4096, True)]
QUICK_METHODS = "sdpa,ours,ours_split"


def bench(fn, q, k, v, table, causal, warmup, rep, graph=False, **kw):
    """(fwd ms, fwd+bwd ms, peak extra GiB) or 'OOM' strings. ``graph``: the two timings again with the calls
    replayed from a CUDA graph (``fwd_graph_ms``, ``fwdbwd_graph_ms``): GPU time alone, without the host's
    launch work, which short calls (the packed rows) may not hide behind the GPU's."""
    with _settings(getattr(fn, "overrides", {})):  # over the backward too, which reads some of them
        return _bench(fn, q, k, v, table, causal, warmup, rep, graph, **kw)


def _bench(fn, q, k, v, table, causal, warmup, rep, graph, **kw):
    res = {}
    try:
        with torch.no_grad():
            fn(q, k, v, table, causal, **kw)
        res["fwd_ms"] = triton.testing.do_bench(
            lambda: fn(q, k, v, table, causal, **kw), warmup=warmup, rep=rep, return_mode="median"
        )
        grad = torch.randn_like(q)

        def step():
            fn(q, k, v, table, causal, **kw).backward(grad)

        step()
        res["fwdbwd_ms"] = triton.testing.do_bench(
            step, warmup=warmup, rep=rep, grad_to_none=[q, k, v, table], return_mode="median"
        )
        for t in (q, k, v, table):
            t.grad = None
        if graph:
            try:
                res["fwd_graph_ms"] = triton.testing.do_bench_cudagraph(
                    lambda: fn(q, k, v, table, causal, **kw), rep=rep, return_mode="median"
                )
                res["fwdbwd_graph_ms"] = triton.testing.do_bench_cudagraph(
                    step, rep=rep, grad_to_none=[q, k, v, table], return_mode="median"
                )
            except Exception as e:  # reported, not fatal: the eager timings stand
                res["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            for t in (q, k, v, table):
                t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        res["mem_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        for t in (q, k, v, table):
            t.grad = None
    except torch.cuda.OutOfMemoryError:
        res = {"fwd_ms": "OOM", "fwdbwd_ms": "OOM", "mem_gib": "OOM"}
    torch.cuda.empty_cache()
    return res


def _median_run(runs):
    """One method's rounds in one: the median of each timing (an OOM in any round makes it OOM), the peak memory
    of the first round."""
    out = dict(runs[0])
    for key in ("fwd_ms", "fwdbwd_ms"):
        vals = [r[key] for r in runs]
        out[key] = "OOM" if any(isinstance(x, str) for x in vals) else statistics.median(vals)
    return out


def tflops(ms, flops):
    return "OOM" if ms == "OOM" else flops / (ms * 1e-3) / 1e12


def fmt(x, nd=1):
    return x if isinstance(x, str) else f"{x:.{nd}f}"


def write_reports(args, methods, rows, packed_all, t_start, complete):
    """The report as JSON, CSV and markdown under args.out: rewritten after every row, so that a run cut short
    (a time limit) keeps what it measured, marked partial until the last write."""
    commit = args.commit or os.environ.get("FAT5_COMMIT")  # as bench_kernels.py: for a copied, stale checkout
    if commit is None:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
        except Exception:
            commit = "unknown"
    meta = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit,
        "setting": f"bf16, H={H}, B*L={TOKENS}, scale 1.0, T5 buckets {BUCKETS} / max distance {MAXDIST}",
        "seconds": round(time.time() - t_start, 1),
        "rounds": args.rounds,
        "complete": complete,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"attention_{meta['date']}" + ("_quick" if args.quick else "") + args.tag)
    with open(stem + ".json", "w") as f:
        json.dump(
            {"meta": meta, "rows": rows, "packed": packed_all, "configs": at.autotuned_configs()}, f, indent=1
        )
    keys = sorted({k_ for r in rows for k_ in r}, key=lambda s: (s not in ("d", "L", "B", "causal"), s))
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    ratio_methods = [m for m in methods if m in RATIO] if "sdpa" in methods else []
    lines = [
        f"# Attention with T5 relative bias: {meta['date']}"
        + (" (quick)" if args.quick else "")
        + ("" if complete else " (partial: written after each row, the run has not finished)"),
        "",
        f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}.",
        f"Setting: {meta['setting']}. TFLOP/s fwd / fwd+bwd (median of do_bench"
        + (f"; median over {args.rounds} interleaved rounds per cell" if args.rounds > 1 else "")
        + "); memory = peak extra GiB during one fwd+bwd.",
        "",
        "| D | causal | L | "
        + " | ".join(methods)
        + "".join(f" | {m} / sdpa (fwd, fwd+bwd)" for m in ratio_methods)
        + " | ours / flex fwd+bwd | mem "
        + " / ".join(methods)
        + " |",
        "|" + "---|" * (3 + len(methods) + len(ratio_methods) + 2),
    ]
    for r in rows:
        cells_ = [f"{fmt(r[m + '_fwd'], 0)} / {fmt(r[m + '_fwdbwd'], 0)}" for m in methods]
        ratios, ratio_flex = [], "-"
        for m in ratio_methods:
            keys = (f"{m}_fwd", "sdpa_fwd", f"{m}_fwdbwd", "sdpa_fwdbwd")
            if all(isinstance(r[x], float) for x in keys):
                ratios.append(
                    f"{r[m + '_fwd'] / r['sdpa_fwd']:.0%} / {r[m + '_fwdbwd'] / r['sdpa_fwdbwd']:.0%}"
                )
            else:
                ratios.append("-")
        if (
            "flex" in methods
            and isinstance(r.get("flex_fwdbwd"), float)
            and isinstance(r.get("ours_fwdbwd"), float)
        ):
            ratio_flex = f"{r['ours_fwdbwd'] / r['flex_fwdbwd']:.1f}x"
        mem = " / ".join(fmt(r[m + "_mem"], 2) for m in methods)
        lines.append(
            f"| {r['d']} | {'yes' if r['causal'] else 'no'} | {r['L']} | "
            + " | ".join(cells_)
            + "".join(f" | {x}" for x in ratios)
            + f" | {ratio_flex} | {mem} |"
        )
    for name, packed in packed_all.items():
        o, p = packed["one_doc"], packed["eight_docs"]
        lines += [
            "",
            f"Packed ({name}, B=8, L=4096, D=64, non-causal): one document {fmt(o['fwd_ms'], 3)} ms fwd / "
            f"{fmt(o['fwdbwd_ms'], 3)} ms fwd+bwd; 8 documents {packed['doc_lengths']} {fmt(p['fwd_ms'], 3)} "
            f"ms / {fmt(p['fwdbwd_ms'], 3)} ms; speedup {fmt(packed.get('speedup_fwd', '-'), 2)}x fwd, "
            f"{fmt(packed.get('speedup_fwdbwd', '-'), 2)}x fwd+bwd (128x128 tiles that hold a query-key pair of "
            f"one document: {fmt(packed['tile_ratio'], 2)}x fewer than for one document).",
        ]
        if "speedup_fwd_graph" in packed:
            lines[-1] += (
                f" Replayed from a CUDA graph (GPU time alone): one document {fmt(o['fwd_graph_ms'], 3)} / "
                f"{fmt(o['fwdbwd_graph_ms'], 3)} ms, 8 documents {fmt(p['fwd_graph_ms'], 3)} / "
                f"{fmt(p['fwdbwd_graph_ms'], 3)} ms; speedup {fmt(packed['speedup_fwd_graph'], 2)}x fwd, "
                f"{fmt(packed['speedup_fwdbwd_graph'], 2)}x fwd+bwd."
            )
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    if complete:
        print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--d128-lengths", default="1024,4096")
    ap.add_argument("--flex-lengths", default="512,1024,2048,4096", help="flex compiles per shape: keep few")
    ap.add_argument("--methods", default="sdpa,sdpa_bias,flex,ours,ours_split")
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"only the rows {QUICK_CELLS} (D, L, causal) and the packed row; methods {QUICK_METHODS} "
        "unless --methods is given; report named attention_<date>_quick",
    )
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rep", type=int, default=40)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time every method of a cell this many times, interleaved (each round starts one method later), "
        "and report each timing's median over the rounds (the rounds go into the JSON)",
    )
    ap.add_argument(
        "--commit",
        default=None,
        help="the code's commit for the report (default: $FAT5_COMMIT, else git's HEAD)",
    )
    ap.add_argument(
        "--packed-graph",
        action="store_true",
        help="time the packed rows from CUDA graphs as well (GPU time alone, no host launch work)",
    )
    ap.add_argument("--tag", default="", help="suffix of the report's file names")
    ap.add_argument("--no-packed", action="store_true", help="skip the packed-documents rows")
    args = ap.parse_args()
    if args.quick and "--methods" not in sys.argv:
        args.methods = QUICK_METHODS
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    flex_lengths = {int(x) for x in args.flex_lengths.split(",") if x}
    rows, packed_all = [], {}
    cells = [(64, int(x), c) for c in (False, True) for x in args.lengths.split(",") if x]
    cells += [(128, int(x), c) for c in (False, True) for x in args.d128_lengths.split(",") if x]
    if args.quick:
        cells = QUICK_CELLS
    t_start = time.time()
    for d, length, causal in cells:
        b = max(TOKENS // length, 1)
        q, k, v, table = make_inputs(b, length, d, causal)
        flops = 4 * b * H * length * length * d / (2 if causal else 1)
        row = {"d": d, "L": length, "B": b, "causal": causal}
        timed = [m for m in methods if not (m.startswith("flex") and (length not in flex_lengths or d != 64))]
        for name in methods:
            if name not in timed:
                row.update({f"{name}_fwd": "-", f"{name}_fwdbwd": "-", f"{name}_mem": "-"})
        runs = {name: [] for name in timed}
        for rnd in range(args.rounds):  # each round starts one method later: no method is always first
            for name in timed[rnd % len(timed) :] + timed[: rnd % len(timed)]:
                runs[name].append(bench(METHODS[name], q, k, v, table, causal, args.warmup, args.rep))
        for name in timed:
            r = _median_run(runs[name])
            if args.rounds > 1:
                row[f"{name}_fwd_ms_rounds"] = [x["fwd_ms"] for x in runs[name]]
                row[f"{name}_fwdbwd_ms_rounds"] = [x["fwdbwd_ms"] for x in runs[name]]
            row[f"{name}_fwd"] = tflops(r["fwd_ms"], flops)
            row[f"{name}_fwdbwd"] = tflops(r["fwdbwd_ms"], 3.5 * flops)
            row[f"{name}_mem"] = r["mem_gib"]
            row[f"{name}_fwd_ms"], row[f"{name}_fwdbwd_ms"] = r["fwd_ms"], r["fwdbwd_ms"]
        rows.append(row)
        print(
            json.dumps({k_: (round(v_, 3) if isinstance(v_, float) else v_) for k_, v_ in row.items()}),
            flush=True,
        )
        write_reports(args, methods, rows, packed_all, t_start, complete=False)
        del q, k, v, table
        torch.cuda.empty_cache()

    # packed documents: 8 docs totalling 4096 vs one document, for each of our variants; two layouts: random
    # lengths (document boundaries cut through tiles) and 8 equal documents of 512 (whole tiles)
    length, b = 4096, 8
    g = torch.Generator().manual_seed(3)
    layouts = {
        "random": torch.sort(torch.randperm(length - 1, generator=g)[:7] + 1).values,
        "equal": torch.arange(1, 8) * (length // 8),
    }
    for name in (m for m in methods if m in OURS and not args.no_packed):
        q, k, v, table = make_inputs(b, length, 64, False)
        one = bench(METHODS[name], q, k, v, table, False, args.warmup, args.rep, graph=args.packed_graph)
        for layout, cuts in layouts.items():
            doc_lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([length])])).tolist()
            seg = torch.bucketize(torch.arange(length), cuts, right=True).to(torch.int32)
            seg = seg[None].expand(b, length).contiguous().cuda()
            pk = bench(
                METHODS[name], q, k, v, table, False, args.warmup, args.rep, graph=args.packed_graph, seg=seg
            )
            packed = {
                "one_doc": one,
                "eight_docs": pk,
                "doc_lengths": doc_lengths,
                "tile_ratio": tile_ratio(doc_lengths),
            }
            if isinstance(one["fwd_ms"], float) and isinstance(pk["fwd_ms"], float):
                packed["speedup_fwd"] = one["fwd_ms"] / pk["fwd_ms"]
                packed["speedup_fwdbwd"] = one["fwdbwd_ms"] / pk["fwdbwd_ms"]
            if args.packed_graph and isinstance(pk.get("fwd_graph_ms"), float):
                packed["speedup_fwd_graph"] = one["fwd_graph_ms"] / pk["fwd_graph_ms"]
                packed["speedup_fwdbwd_graph"] = one["fwdbwd_graph_ms"] / pk["fwdbwd_graph_ms"]
            packed_all[f"{name}, {layout}"] = packed
            print(json.dumps({"packed": name, "layout": layout, **packed}), flush=True)
            write_reports(args, methods, rows, packed_all, t_start, complete=False)
        del q, k, v, table
        torch.cuda.empty_cache()

    write_reports(args, methods, rows, packed_all, t_start, complete=True)


if __name__ == "__main__":
    main()
