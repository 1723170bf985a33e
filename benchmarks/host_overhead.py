"""Host time (CPU side) of the kernel path, without a GPU: Triton launches become compile-only (a fake sm_90a
driver, as in attention_registers.py), so what is timed is the Python work per call: argument checks, the
autograd and torch.library layers, the autotuner and Triton's argument binding, and small torch ops on tiny
CPU tensors. Compares, in one process and interleaved, eager calls through the custom ops (what every call paid
before) and through their autograd.Function twins (ops/registration.py), for one flash_attention fwd+bwd and
one training step (fwd+bwd) of a 12+12-layer model; the packed-document tile tables built by the torch
reference (about 60 small ops) against the Triton kernel that replaced it; and one AdamWScale step on its
kernel path for the 282 tensors of T5 base.

    .venv/bin/python benchmarks/host_overhead.py      # on a CPU machine, TRITON_INTERPRET unset
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("unset TRITON_INTERPRET: launches are replaced by sm_90a compiles")

from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import attention_registers as R  # noqa: E402

driver.set_active(R.CompileOnlyDriver())
JITFunction.run = R._compile_only

import fat5  # noqa: E402
from fat5.ops import attention_triton as A  # noqa: E402
from fat5.ops import registration  # noqa: E402
from fat5.optim import AdamWScale  # noqa: E402

for name in ("_fwd_kernel", "_dq_kernel", "_dkv_kernel"):
    getattr(A, name).configs = getattr(A, name).configs[:1]  # nothing is timed by the autotuner here


def ab(step, reps=15, inner=20):
    for force in (True, False):
        registration.FORCE_CUSTOM_OPS = force
        for _ in range(3):
            step()
    times = {True: [], False: []}
    for _ in range(reps):
        for force in (True, False):
            registration.FORCE_CUSTOM_OPS = force
            t = time.perf_counter()
            for _ in range(inner):
                step()
            times[force].append((time.perf_counter() - t) / inner * 1e6)
            R.compiled.clear()
    registration.FORCE_CUSTOM_OPS = False
    return statistics.median(times[True]), statistics.median(times[False])


def main():
    q = torch.randn(1, 1, 16, 64, dtype=torch.bfloat16, requires_grad=True)
    k, v = torch.randn_like(q, requires_grad=True), torch.randn_like(q, requires_grad=True)
    table = torch.randn(32, 1, requires_grad=True)
    g = torch.randn_like(q)
    ops_, twin = ab(lambda: A.flash_attention(q, k, v, rel_table=table).backward(g))
    print(f"flash_attention fwd+bwd: custom ops {ops_:.0f} us, eager twin {twin:.0f} us (median)")

    seg = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14])
    times = {"ref": [], "kernel": []}
    for _ in range(15):
        for name, fn in (("ref", A._segment_ranges_ref), ("kernel", A._segment_ranges)):
            t = time.perf_counter()
            for _ in range(50):
                fn(seg, seg, 64, 64)
            times[name].append((time.perf_counter() - t) / 50 * 1e6)
    ref_us, ker_us = (statistics.median(times[k]) for k in ("ref", "kernel"))
    print(f"packed-document tables: torch reference {ref_us:.0f} us, one kernel x2 launches {ker_us:.0f} us")

    fat5.ops.set_backend("triton")
    cfg = fat5.FAT5Config.from_preset("base", vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_heads=4)
    model = fat5.FAT5ForConditionalGeneration(cfg)

    # AdamWScale's kernel path over the 282 tensors of T5 base (tiny widths): the Python work per step, plus
    # two foreach ops (step counts, parameter norms) that here compute on CPU tensors
    params = list(model.parameters())
    opt = AdamWScale(params, lr=1e-3, kernel=True)
    for p in params:
        p.grad = torch.randn_like(p)
    skip = torch.zeros((), dtype=torch.bool)
    for _ in range(5):
        opt.step(skip_if=skip)
    times = []
    for _ in range(9):
        t = time.perf_counter()
        for _ in range(20):
            opt.step(skip_if=skip)
        times.append((time.perf_counter() - t) / 20 * 1e3)
    print(f"AdamWScale kernel-path step, {len(params)} tensors: {statistics.median(times):.2f} ms (median)")
    for p in params:
        p.grad = None
    ids, labels = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 8))
    ops_, twin = ab(lambda: model(input_ids=ids, labels=labels).loss.backward(), reps=7, inner=3)
    print(
        f"training step, 12+12 layers (base depth, tiny widths): custom ops {ops_ / 1e3:.1f} ms, "
        f"eager twin {twin / 1e3:.1f} ms (median)"
    )


if __name__ == "__main__":
    main()
