"""Registers and spills of every autotune config of the attention kernels, for sm_90a, without a GPU.

Triton compiles for a target given by hand, and the ptxas bundled with Triton reports registers and spill
bytes (`ptxas -v`). A fake driver makes each kernel launch a compile-only warm-up, and the autotuner
compiles every config instead of timing it. Spills are the first thing to check when a kernel runs far
below its roofline; this needs no GPU. Run on a CPU machine (TRITON_INTERPRET unset):
`.venv/bin/python benchmarks/attention_registers.py --out benchmarks/results`.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


class CompileOnlyDriver:
    """Just enough of a driver for JITFunction.run(warmup=True) to compile for sm_90a."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


compiled: list[tuple[str, dict, object]] = []
_jit_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kw):
    kernel = _jit_run(self, *args, grid=grid, warmup=True, **kw)
    compiled.append((self.fn.__name__, kw, kernel))
    return kernel


def _compile_every_config(self, *args, **kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k != "warmup"}
    self.nargs = dict(zip(self.arg_names, args))
    for cfg in self.prune_configs(kwargs):
        self.fn.run(*args, warmup=True, **kwargs, **cfg.all_kwargs())


def compile_only() -> None:
    """Make kernel launches in this process compile for sm_90a instead of running (and every autotune config
    compile instead of being timed); refuses to run under the interpreter, which would compile nothing."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles real sm_90a code")
    driver.set_active(CompileOnlyDriver())
    JITFunction.run = _compile_only
    Autotuner.run = _compile_every_config


def ptxas_report(ptx: str) -> tuple[int, int]:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    r = subprocess.run(
        [ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True
    )
    os.remove(f.name)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else 0


def sass_loops(cubin: bytes) -> list[tuple[int, dict[str, int]]]:
    """The loops of a kernel's SASS (a backward branch closes one), in program order: instructions per
    iteration and the count of each opcode (without modifiers). Static counts: what one iteration issues per
    warp, a proxy for its cost where the loop is not waiting on memory."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    r = subprocess.run([nvdisasm, f.name], capture_output=True, text=True)
    os.remove(f.name)
    labels, ins = {}, []
    for line in r.stdout.splitlines():
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+([^.\s].*?);", line)
        if m:
            ins.append(m.group(1).strip())
    loops = []
    for i, text in enumerate(ins):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", text)
        if m and labels.get(m.group(1), i + 1) <= i:
            ops: dict[str, int] = {}
            for t in ins[labels[m.group(1)] : i + 1]:
                op = re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]
                ops[op] = ops.get(op, 0) + 1
            if i > labels[m.group(1)]:  # not the branch-to-self that ends a kernel
                loops.append((i + 1 - labels[m.group(1)], ops))
    return loops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--kinds", default="t5,none")
    p.add_argument("--variants", default="split,table", help="inner-loop variants (they differ only with t5)")
    p.add_argument(
        "--segments", default="no,yes", help="compile without and/or with packed-document segment ids"
    )
    p.add_argument(
        "--seg-dtype", default="int64", choices=["int32", "int64"], help="dtype of the segment ids"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a setting of fat5.ops.attention_triton before compiling (a Python literal), e.g. "
        "KV_TMA=True, HALF_TABLE=False, NEAR={'fwd':64,'dkv':32,'dq':32}; repeatable",
    )
    p.add_argument("--tag", default="", help="suffix of the report's file name")
    p.add_argument(
        "--loops",
        action="store_true",
        help="also list each kernel's SASS loops (nvdisasm): instructions per iteration, and the opcodes that "
        "differ most between loops",
    )
    args = p.parse_args()
    compile_only()
    from fat5.ops import attention_triton as A

    for item in args.set:
        name, _, value = item.partition("=")
        if not hasattr(A, name):
            p.error(f"--set {item}: fat5.ops.attention_triton has no setting {name!r}")
        try:
            setattr(A, name, ast.literal_eval(value))
        except (ValueError, SyntaxError):
            p.error(f"--set {item}: {value!r} is not a Python literal (e.g. True, 64, {{'fwd': 64}})")

    rows, details = [], []
    t0 = time.time()
    errors = []
    for variant in args.variants.split(","):
        A.set_variant(variant)
        for d in map(int, args.head_dims.split(",")):
            for kind in args.kinds.split(","):
                if variant != "table" and not kind.startswith("t5"):
                    continue
                for causal in (False, True):
                    for seg in args.segments.split(","):
                        compiled.clear()
                        q = torch.randn(2, 2, 300, d, dtype=torch.bfloat16, requires_grad=True)
                        k, v = (
                            torch.randn_like(q, requires_grad=True),
                            torch.randn_like(q, requires_grad=True),
                        )
                        extra = {}
                        if kind in ("t5", "t5-nograd"):  # t5-nograd: the table needs no gradient
                            extra = dict(
                                rel_table=torch.randn(32, 2, requires_grad=kind == "t5"),
                                rel_bidirectional=not causal,
                            )
                        if seg == "yes":
                            ids = torch.tensor(
                                [[1] * 120 + [2] * 180] * 2, dtype=getattr(torch, args.seg_dtype)
                            )
                            extra.update(q_segment_ids=ids, kv_segment_ids=ids)
                        try:
                            A.flash_attention(q, k, v, causal=causal, **extra).float().sum().backward()
                        except Exception as e:  # a kernel that does not compile is the finding
                            errors.append(
                                f"{variant} d{d} {kind} causal={causal} seg={seg}: {type(e).__name__}: {e}"
                            )
                            continue
                        for name, kw, kernel in compiled:
                            if "BLOCK_N" not in kw:  # the tiled kernels (not the small delta pass)
                                continue
                            regs, spill = ptxas_report(kernel.asm["ptx"])
                            nw, ns = kernel.metadata.num_warps, kernel.metadata.num_stages
                            cfg = f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{nw} s{ns}"
                            if kw.get("maxnreg"):
                                cfg += f" maxnreg {kw['maxnreg']}"
                            if kw.get("NEAR_CFG"):  # the config's own near-step width
                                cfg += f" near {kw['NEAR_CFG']}"
                            kname = name.strip("_")
                            if kw.get("SEG_PASS"):  # segment ids: the document pass (1) and the rest (2)
                                kname += f" pass {kw['SEG_PASS']}"
                            smem = (
                                f"{kernel.metadata.shared / 1024:.1f}"  # KiB of shared memory a program needs
                            )
                            row = (variant, d, kind, causal, seg, kname, cfg, regs, spill, smem)
                            if args.loops:
                                loops = sass_loops(kernel.asm["cubin"])
                                row += (" / ".join(str(n) for n, _ in loops),)
                                details.append((row, loops))
                            rows.append(row)
                            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    day = time.strftime("%Y-%m-%d")
    lines = [
        f"# Attention kernels: registers and spills per autotune config, sm_90a ({day})",
        "",
        f"triton {triton.__version__}, ptxas bundled with it; compiled offline (no GPU), "
        f"{time.time() - t0:.0f}s. Command: `.venv/bin/python benchmarks/attention_registers.py "
        f"{shlex.join(sys.argv[1:])}`.",
        "",
        f"{len(rows)} kernels compiled, {len(errors)} specialisations failed to compile"
        + ("".join(f"\n- {e}" for e in errors) if errors else "."),
        "",
        "| variant | head dim | bias | causal | segments | kernel | config | registers | spill bytes | shared KiB |"
        + (" SASS loops: instructions per iteration |" if args.loops else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.loops else ""),
    ]
    lines += [f"| {' | '.join(map(str, r))} |" for r in rows]
    if details:
        lines += ["", "## Opcodes per loop iteration (the 12 most frequent in each kernel's loops)", ""]
        for row, loops in details:
            total: dict[str, int] = {}
            for _, ops in loops:
                for op, n in ops.items():
                    total[op] = total.get(op, 0) + n
            top = sorted(total, key=lambda o: -total[o])[:12]
            lines += [f"{' '.join(map(str, row[:7]))}:", "", "| loop | " + " | ".join(top) + " | all |"]
            lines += ["|---" * (len(top) + 2) + "|"]
            lines += [
                f"| {i} | " + " | ".join(str(ops.get(o, 0)) for o in top) + f" | {n} |"
                for i, (n, ops) in enumerate(loops)
            ]
            lines += [""]
    (out / f"attention_registers_{day}{args.tag}.md").write_text("\n".join(lines) + "\n")
    if details:  # every opcode's count per loop, for diffs between settings
        full = [{"kernel": list(row[:7]), "loops": [ops for _, ops in loops]} for row, loops in details]
        (out / f"attention_registers_{day}{args.tag}_loops.json").write_text(json.dumps(full))
    print(lines[4])


if __name__ == "__main__":
    main()
