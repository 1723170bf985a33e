"""Generation speed: fat5 `generate` (static KV cache + CUDA-graph decode step) vs transformers T5 `generate`.

Question: how many tokens/s and ms per decode step does fat5 reach against `transformers`'
T5ForConditionalGeneration.generate on the same weights and GPU? Setting: T5 v1.1
base (fat5 preset `base`, random init, bf16 weights), 512 input tokens, exactly 128 new tokens
(min_new_tokens = max_new_tokens), greedy at batch 1/16/64 and 4 beams at batch 1/64.

tokens/s counts returned new tokens (batch * 128, beams not counted); ms per decode step = wall time of one
whole `generate` call (encoder included) / 128. Median of --repeats calls after a warm-up
call (which captures fat5's graph). Before timing it checks on the GPU: graph replay == eager decoding
(token-exact), and token agreement with transformers' greedy output (bf16: not expected to be 100%).

Run from the repository root on a CUDA machine: `python3 benchmarks/bench_generate.py --out benchmarks/results`.
Writes generate-<date>.md and .json under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from fat5 import FAT5Config, FAT5ForConditionalGeneration, ops  # noqa: E402
from fat5.generation import generate  # noqa: E402
from fat5.hf import hf_config_dict, hf_state_dict  # noqa: E402

# transformers' figures from an earlier reference measurement on an H200 (beams, batch) -> (tokens/s, ms/step)
REFERENCE_HF = {
    (1, 1): (54, 18.6),
    (1, 16): (1024, 15.6),
    (1, 64): (3744, 17.1),
    (4, 1): (58, 17.2),
    (4, 64): (2180, 29.4),
}


def git_commit() -> str:
    if os.environ.get("FAT5_COMMIT"):
        return os.environ["FAT5_COMMIT"]
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL
        ).strip()
    except Exception:
        return "unknown"


def build(preset: str, device: str):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = FAT5Config.from_preset(preset)
    ours = FAT5ForConditionalGeneration(cfg).eval()
    hf_cfg = {k: v for k, v in hf_config_dict(cfg).items() if k not in ("architectures", "model_type")}
    hf = T5ForConditionalGeneration(T5Config(**hf_cfg)).eval()
    if not cfg.tie_word_embeddings:  # transformers 5 ties lm_head to shared at init: untie before loading
        hf.lm_head.weight = torch.nn.Parameter(torch.empty_like(hf.lm_head.weight))
    missing, unexpected = hf.load_state_dict(hf_state_dict(ours), strict=False)
    assert not unexpected and all("embed_tokens" in k for k in missing), (missing, unexpected)
    ours = ours.to(device=device, dtype=torch.bfloat16)
    hf = hf.to(device=device, dtype=torch.bfloat16)
    for name, p in (("shared.weight", ours.shared.weight), ("lm_head.weight", ours._output_weight())):
        assert torch.equal(p, hf.get_parameter(name)), f"{name} differs between the two models"
    return ours, hf


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (graph capture for fat5, cuBLAS / allocator for both)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def checks(ours, hf, ids, mask) -> dict:
    res = {}
    kw = dict(max_new_tokens=32, min_new_tokens=32)
    a = generate(ours, ids[:16], mask[:16], use_cuda_graph=True, **kw)
    b = generate(ours, ids[:16], mask[:16], use_cuda_graph=False, **kw)
    res["greedy graph == eager (static cache)"] = bool(torch.equal(a, b))
    c = generate(ours, ids[:16], mask[:16], use_cuda_graph=False, cache_implementation="dynamic", **kw)
    res["greedy static == dynamic cache, token agreement"] = round((a == c).float().mean().item(), 4)
    a4 = generate(ours, ids[:4], mask[:4], num_beams=4, use_cuda_graph=True, **kw)
    b4 = generate(ours, ids[:4], mask[:4], num_beams=4, use_cuda_graph=False, **kw)
    res["beam-4 graph == eager (static cache)"] = bool(torch.equal(a4, b4))
    h = hf.generate(input_ids=ids[:16], attention_mask=mask[:16], **kw)
    res["greedy token agreement with transformers (bf16)"] = round((a == h).float().mean().item(), 4)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--beam-batches", default="1,64")
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="auto", choices=("auto", "reference"), help="fat5.ops backend")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print a kernel profile of a batch-64 beam step")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_generate.py needs a CUDA GPU")
    ops.set_backend(args.backend)
    import transformers
    import triton

    ours, hf = build(args.preset, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    n_max = max(int(b) for b in (args.batches + "," + args.beam_batches).split(","))
    ids = torch.randint(2, ours.config.vocab_size, (n_max, args.input_len), device="cuda", generator=g)
    mask = torch.ones_like(ids)
    notes = []
    try:
        check = checks(ours, hf, ids, mask)
    except Exception:  # a kernel path that cannot be captured: fall back to the reference ops, say so
        if args.backend == "reference":
            raise
        notes.append(
            "backend 'auto' failed under graph capture; fell back to 'reference':\n"
            + traceback.format_exc(limit=3)
        )
        ops.set_backend("reference")
        check = checks(ours, hf, ids, mask)
    print(json.dumps(check, indent=1), flush=True)

    new = args.new_tokens
    kw = dict(max_new_tokens=new, min_new_tokens=new)
    configs = [(1, int(b)) for b in args.batches.split(",")] + [
        (args.beams, int(b)) for b in args.beam_batches.split(",")
    ]
    rows = []
    for beams, batch in configs:
        x, m = ids[:batch], mask[:batch]
        row = dict(beams=beams, batch=batch)
        for name, fn in (
            ("fat5", lambda x=x, m=m, k=beams: generate(ours, x, m, num_beams=k, **kw)),
            (
                "hf",
                lambda x=x, m=m, k=beams: hf.generate(
                    input_ids=x, attention_mask=m, num_beams=k, do_sample=False, **kw
                ),
            ),
        ):
            if name == "hf" and args.skip_hf:
                continue
            torch.cuda.reset_peak_memory_stats()
            sec, out = timed(fn, args.repeats)
            assert out.shape == (batch, new + 1), (name, out.shape)
            row[f"{name}_tok_s"] = batch * new / sec
            row[f"{name}_ms_step"] = 1000 * sec / new
            row[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        ours._fat5_graph_step = None  # free the captured graph's buffers before the next shape
        anchor = REFERENCE_HF.get((beams, batch)) if args.preset == "base" else None
        if anchor:
            row["anchor_tok_s"], row["anchor_ms_step"] = anchor
        if "hf_tok_s" in row:
            row["speedup"] = row["fat5_tok_s"] / row["hf_tok_s"]
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows.append(row)

    env = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        commit=git_commit(),
        ops_backend=ops.get_backend(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    targets = []
    by = {(r["beams"], r["batch"]): r for r in rows}
    if "hf_tok_s" in rows[0]:
        if (1, 64) in by:
            targets.append(("greedy batch 64 tokens/s >= 5x transformers", by[(1, 64)]["speedup"], 5.0))
        if (args.beams, 64) in by:
            targets.append(
                (
                    f"{args.beams} beams batch 64 tokens/s >= 3x transformers",
                    by[(args.beams, 64)]["speedup"],
                    3.0,
                )
            )
        if (1, 1) in by:
            r = by[(1, 1)]
            targets.append(
                ("batch-1 ms/token <= 1/3 of transformers'", r["hf_ms_step"] / r["fat5_ms_step"], 3.0)
            )
    if args.profile:
        profile_step(ours, ids, mask, args.beams, args.input_len)
    write_report(Path(args.out), args, env, check, rows, targets, notes)


def profile_step(ours, ids, mask, beams: int, n_in: int) -> None:
    """Where a large-batch beam step spends GPU time (eager path, so kernels are attributed)."""
    from torch.profiler import ProfilerActivity, profile

    x, m = ids[:64], mask[:64]
    generate(ours, x, m, num_beams=beams, max_new_tokens=4, min_new_tokens=4, use_cuda_graph=False)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate(ours, x, m, num_beams=beams, max_new_tokens=8, min_new_tokens=8, use_cuda_graph=False)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


def write_report(out: Path, args, env, check, rows, targets, notes) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"generate-{env['date'][:10]}"
    (out / f"{stem}.json").write_text(
        json.dumps(
            dict(env=env, args=vars(args), checks=check, rows=rows, targets=targets, notes=notes), indent=2
        )
    )
    lines = [
        f"# fat5 generate vs transformers T5 generate ({env['date'][:10]})",
        "",
        f"GPU {env['gpu']}; torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, transformers "
        f"{env['transformers']}, python {env['python']}; commit `{env['commit']}`; fat5 ops backend "
        f"`{env['ops_backend']}`.",
        "",
        f"Preset `{args.preset}` (random init, bf16 weights), {args.input_len} input tokens, exactly "
        f"{args.new_tokens} new tokens (min_new_tokens = max_new_tokens). fat5: static KV cache + decode step "
        "captured in a CUDA graph. tokens/s = batch x new tokens / wall time of one generate call (encoder "
        "included, beams not counted); ms/step = that time / new tokens. Median of "
        f"{args.repeats} calls after a warm-up call. Command: `python3 benchmarks/bench_generate.py --out "
        f"{args.out}`.",
        "",
        "| beams | batch | fat5 tokens/s | fat5 ms/step | transformers tokens/s | transformers ms/step | speedup | "
        "fat5 / transformers peak GiB | earlier reference: transformers tokens/s, ms/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['beams']} | {r['batch']} | {r['fat5_tok_s']:,.0f} | {r['fat5_ms_step']:.2f} | "
            f"{r.get('hf_tok_s', float('nan')):,.0f} | {r.get('hf_ms_step', float('nan')):.2f} | "
            f"{r.get('speedup', float('nan')):.1f}x | {r['fat5_peak_gib']:.1f} / {r.get('hf_peak_gib', float('nan')):.1f} | "
            f"{r.get('anchor_tok_s', '-')}, {r.get('anchor_ms_step', '-')} |"
        )
    lines += ["", "Targets:", ""]
    lines += [f"- {name}: {val:.1f}x -> {'met' if val >= need else 'MISSED'}" for name, val, need in targets]
    lines += ["", "Checks on the GPU (bf16):", ""] + [f"- {k}: {v}" for k, v in check.items()]
    if notes:
        lines += ["", "Notes:", ""] + [f"```\n{n}\n```" for n in notes]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
