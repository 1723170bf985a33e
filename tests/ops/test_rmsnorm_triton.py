"""rms_norm_triton against rms_norm_ref: y, the new residual, dx, d residual and dweight.

Error rule (DESIGN.md): in low precision the kernel's max error against the float64 reference is at most
2x (values) / 3x (gradients) the reference's own error at that precision, plus a small floor.
"""

import pytest
import torch
from kernel_checks import _assert_within, _poison_empty, zero_fills  # noqa: F401  (autouse fixture)

from fat5.ops.rmsnorm import rms_norm_ref, rms_norm_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(fn, x, w, residual, grads_out, eps=1e-6, out_dtype=None):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    r = residual.detach().clone().requires_grad_() if residual is not None else None
    out = fn(x, w, eps, r, out_dtype)
    outs = out if r is not None else (out,)
    inputs = [x, w] + ([r] if r is not None else [])
    grads = torch.autograd.grad(outs, inputs, [g.to(o.dtype) for g, o in zip(grads_out, outs)])
    return outs, grads


def _check(shape, dtype, with_residual, w_dtype=None, device=DEVICE, r_dtype=None, out_dtype=None):
    n = shape[-1]
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    w = (1 + 0.3 * torch.randn(n, device=device)).to(w_dtype or dtype)
    r = torch.randn(shape, device=device).to(r_dtype or dtype) if with_residual else None
    grads_out = [torch.randn(shape, device=device).to(dtype) for _ in range(2 if with_residual else 1)]
    outs, grads = _run(rms_norm_triton, x, w, r, grads_out, out_dtype=out_dtype)
    outs_lp, grads_lp = _run(rms_norm_ref, x, w, r, grads_out, out_dtype=out_dtype)
    outs64, grads64 = _run(
        rms_norm_ref,
        x.double(),
        w.double(),
        r.double() if r is not None else None,
        [g.double() for g in grads_out],
    )
    all_fp32 = all(t in (None, torch.float32) for t in (dtype, r_dtype, out_dtype))
    floor = 1e-5 if all_fp32 else 1e-6
    for name, o, o_lp, o64 in zip(("y", "new_residual"), outs, outs_lp, outs64):
        assert o.dtype == o_lp.dtype and o.shape == x.shape, name
        _assert_within(name, o, o_lp, o64, 2, floor)
    for name, g, g_lp, g64 in zip(("dx", "dweight", "dresidual"), grads, grads_lp, grads64):
        assert g.dtype == g_lp.dtype, name
        # dweight sums over all rows: scale the floor with the row count
        _assert_within(name, g, g_lp, g64, 3, floor * (x.numel() // n if name == "dweight" else 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (127, 100), (5, 3000), (2, 3, 96)])
def test_matches_reference(shape, with_residual, dtype):
    _check(shape, dtype, with_residual)


def test_fp32_weight_with_half_input():
    _check((33, 80), torch.float16, True, w_dtype=torch.float32)


@pytest.mark.parametrize(
    "dtype,r_dtype,out_dtype,with_residual",
    [
        (torch.float16, torch.float32, torch.float16, True),  # layer output onto an fp32 stream, autocast
        (torch.float16, torch.float32, None, True),
        (torch.float32, torch.float16, torch.float16, True),
        (torch.float32, None, torch.float16, True),
        (torch.float32, None, torch.float16, False),  # the first norm under autocast: fp32 in, fp16 out
        (torch.float16, None, torch.float32, False),
    ],
)
def test_mixed_dtypes(dtype, r_dtype, out_dtype, with_residual):
    # x, residual and the normed output each in their own dtype; every gradient in its input's dtype
    _check((37, 72), dtype, with_residual, r_dtype=r_dtype, out_dtype=out_dtype)


def test_mixed_dtypes_low_gradient_is_rounded_once():
    # fp16 x onto an fp32 residual: the fp16 gradient of x is the fp32 gradient of the residual, rounded
    x = torch.randn(9, 40, device=DEVICE, dtype=torch.float16, requires_grad=True)
    r = torch.randn(9, 40, device=DEVICE, requires_grad=True)
    w = torch.rand(40, device=DEVICE, requires_grad=True)
    y, h = rms_norm_triton(x, w, 1e-6, r, torch.float16)
    assert (y.dtype, h.dtype) == (torch.float16, torch.float32)
    (y.float().square().sum() + h.sum()).backward()
    assert x.grad.dtype == torch.float16 and r.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, r.grad.to(torch.float16), rtol=0, atol=0)


def test_bf16_and_fp16_widen_both():
    x = torch.randn(4, 32, device=DEVICE, dtype=torch.float16)
    r = torch.randn(4, 32, device=DEVICE, dtype=torch.bfloat16)
    w = torch.ones(32, device=DEVICE)
    y, h = rms_norm_triton(x, w, 1e-6, r)
    y_ref, h_ref = rms_norm_ref(x, w, 1e-6, r)
    assert y.dtype == y_ref.dtype == torch.float32 and h.dtype == h_ref.dtype == torch.float32
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref)


def test_residual_promotes_like_torch():
    x = torch.randn(4, 32, device=DEVICE, dtype=torch.float16)
    r = torch.randn(4, 32, device=DEVICE)
    w = torch.ones(32, device=DEVICE)
    y, h = rms_norm_triton(x, w, 1e-6, r)
    y_ref, h_ref = rms_norm_ref(x, w, 1e-6, r)
    assert y.dtype == y_ref.dtype == torch.float32 and h.dtype == torch.float32
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)


def test_only_new_residual_used():
    # grad flows into x and residual through the returned residual alone (dy is None in backward)
    x = torch.randn(6, 48, device=DEVICE, requires_grad=True)
    r = torch.randn(6, 48, device=DEVICE, requires_grad=True)
    w = torch.ones(48, device=DEVICE, requires_grad=True)
    _, h = rms_norm_triton(x, w, 1e-6, r)
    (h * 3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
    torch.testing.assert_close(r.grad, torch.full_like(r, 3.0))
    torch.testing.assert_close(w.grad, torch.zeros_like(w))


def test_only_normed_output_used():
    # the returned residual is unused: its gradient reaches the rule as None and counts as zero
    x = torch.randn(7, 40, device=DEVICE, requires_grad=True)
    r = torch.randn(7, 40, device=DEVICE, requires_grad=True)
    w = (1 + 0.3 * torch.randn(40, device=DEVICE)).requires_grad_()
    g = torch.randn(7, 40, device=DEVICE)
    got = torch.autograd.grad(rms_norm_triton(x, w, 1e-6, r)[0], (x, r, w), g)
    want = torch.autograd.grad(rms_norm_ref(x, w, 1e-6, r)[0], (x, r, w), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("with_residual", [False, True])
def test_backward_fills_no_zero_gradients(with_residual):
    # the saved 1/rms (and an unused new residual) get no gradient: autograd would otherwise materialise a
    # zero tensor for each on every backward, one fill kernel per call on the GPU
    x = torch.randn(9, 64, device=DEVICE, requires_grad=True)
    w = torch.ones(64, device=DEVICE, requires_grad=True)
    r = torch.randn(9, 64, device=DEVICE) if with_residual else None
    out = rms_norm_triton(x, w, 1e-6, r)
    y = out[0] if with_residual else out
    g = torch.ones_like(y)
    fills = zero_fills(lambda: torch.autograd.grad(y, (x, w), g))
    assert not fills, fills


@pytest.mark.parametrize("with_residual", [False, True])
def test_rows_of_no_elements(with_residual):
    # d = 0: empty outputs of the reference's shapes and dtypes, and empty gradients (no kernel is launched)
    x = torch.randn(3, 0, device=DEVICE, requires_grad=True)
    w = torch.ones(0, device=DEVICE, dtype=torch.float16, requires_grad=True)
    r = torch.randn(3, 0, device=DEVICE, dtype=torch.float64, requires_grad=True) if with_residual else None
    out = rms_norm_triton(x, w, 1e-6, r, torch.float16)
    ref = rms_norm_ref(x, w, 1e-6, r, torch.float16)
    outs, refs = (out, ref) if with_residual else ((out,), (ref,))
    for o, e in zip(outs, refs, strict=True):
        assert o.shape == e.shape == (3, 0) and o.dtype == e.dtype
    grads = torch.autograd.grad(outs[0].sum(), [t for t in (x, w, r) if t is not None], allow_unused=True)
    assert all(g is None or g.numel() == 0 for g in grads)


def test_bad_input():
    with pytest.raises(ValueError, match="weight size"):
        rms_norm_triton(torch.randn(2, 8, device=DEVICE), torch.ones(7, device=DEVICE))
    with pytest.raises(ValueError, match="residual shape"):
        rms_norm_triton(
            torch.randn(2, 8, device=DEVICE), torch.ones(8, device=DEVICE), 1e-6, torch.randn(3, 8)
        )
    with pytest.raises(ValueError, match="out_dtype must be a floating dtype"):
        rms_norm_triton(
            torch.randn(2, 8, device=DEVICE), torch.ones(8, device=DEVICE), 1e-6, None, torch.int32
        )


def test_torch_library_registration():
    x, w, r = (
        torch.randn(5, 40, device=DEVICE),
        torch.rand(40, device=DEVICE),
        torch.randn(5, 40, device=DEVICE),
    )
    torch.library.opcheck(
        torch.ops.fat5.rms_norm_fwd, (x.requires_grad_(), w.requires_grad_(), None, 1e-6, None)
    )
    torch.library.opcheck(torch.ops.fat5.rms_norm_fwd, (x, w, r.requires_grad_(), 1e-5, None))
    torch.library.opcheck(torch.ops.fat5.rms_norm_fwd, (x.half(), w, r.requires_grad_(), 1e-5, torch.float16))


def test_compiles_without_graph_break():
    x = torch.randn(3, 7, 24, device=DEVICE, requires_grad=True)
    r = torch.randn(3, 7, 24, device=DEVICE, requires_grad=True)
    w = torch.rand(24, device=DEVICE, requires_grad=True)

    def block(fn, x, w, r):
        y, h = fn(x, w, 1e-6, r)
        return (y * h).sum()

    torch.compile(lambda *a: block(rms_norm_triton, *a), backend="aot_eager", fullgraph=True)(
        x, w, r
    ).backward()
    refs = [t.detach().requires_grad_() for t in (x, w, r)]
    block(rms_norm_ref, *refs).backward()
    for t, ref in zip((x, w, r), refs):
        torch.testing.assert_close(t.grad, ref.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(4103, 768), (1000, 3000), (64, 4096)])
def test_bf16_gpu(shape, with_residual):
    _check(shape, torch.bfloat16, with_residual, device="cuda")


@pytest.mark.gpu
def test_bf16_onto_fp32_stream_gpu():
    # the model's case under bf16 autocast: bf16 layer output, fp32 residual stream, bf16 normed output
    _check((4103, 768), torch.bfloat16, True, device="cuda", r_dtype=torch.float32, out_dtype=torch.bfloat16)


_COMPILE_PDL = r"""
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile
from fat5.ops import rmsnorm as r

kernels = {
    "fwd": (r._rms_norm_fwd_kernel,
            {"X": "*bf16", "R": "*bf16", "Y": "*bf16", "H": "*bf16", "W": "*bf16", "RSTD": "*fp32",
             "M": "i32", "N": "i32", "eps": "fp32"},
            {"HAS_RES": False, "BLOCK_M": 4, "BLOCK_N": 512, "CHUNK": 512}),
    "bwd": (r._rms_norm_bwd_kernel,
            {"DY": "*bf16", "DRES": "*bf16", "H": "*bf16", "W": "*bf16", "RSTD": "*fp32", "DX": "*bf16",
             "DXL": "*bf16", "DW_PARTIAL": "*fp32", "DW": "*bf16", "GROUP_PARTIAL": "*fp32", "COUNT": "*i32",
             "M": "i32", "N": "i32"},
            {"ROWS_PER_PROGRAM": 64, "HAS_DRES": False, "HAS_DXL": False, "BLOCK_M": 8, "BLOCK_N": 512,
             "CHUNK": 512, "STAGES": 3, "PREFETCH": 2}),
    "sum_rows": (r._sum_rows_kernel, {"P": "*fp32", "OUT": "*bf16", "R": "i32", "N": "i32"},
                 {"BLOCK_R": 256, "BLOCK_N": 16}),
}
for name, (fn, sig, consts) in kernels.items():
    for arch, pdl in ((90, True), (90, False), (80, False)):
        consts_ = {**consts, "PDL": pdl}
        sig_ = {**sig, **{k: "constexpr" for k in consts_}}
        k = triton_compile(ASTSource(fn=fn, signature=sig_, constexprs=consts_), target=GPUTarget("cuda", arch, 32),
                           options={"launch_pdl": pdl})
        ptx = k.asm["ptx"]
        print(name, arch, pdl, ptx.count("griddepcontrol"), k.metadata.launch_pdl, ptx.count("prefetch.global.L2"))
"""


def test_pdl_kernels_compile_for_hopper_only(tmp_path):
    """The programmatic-dependent-launch path: compiled offline (no GPU, outside the interpreter) for sm_90 it
    waits on the previous grid (griddepcontrol in the PTX, launch_pdl in the metadata); without PDL, and for an
    sm_80 target, which has no such instruction, nothing of it is emitted. No CUDA device means no PDL. The L2
    prefetches asked for (TUNE["prefetch"]) come only with the wait they run ahead of."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fat5.ops import rmsnorm
    from fat5.ops.launch import pdl

    assert not pdl(torch.device("cpu")) and rmsnorm._pdl(torch.device("cpu")) == {}
    script = tmp_path / "compile_pdl.py"
    script.write_text(_COMPILE_PDL)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.splitlines()]
    assert len(rows) == 9
    assert {(r[1], r[2]) for r in rows} == {("90", "True"), ("90", "False"), ("80", "False")}
    for name, _arch, with_pdl, n_gdc, meta_pdl, n_prefetch in rows:
        if with_pdl == "True":
            # fwd and bwd wait and release their dependents; the last kernel of the chain only waits
            assert int(n_gdc) == (1 if name == "sum_rows" else 2) and meta_pdl == "True", rows
            # the backward's first 2 tiles of h and of dy, one request per thread and tile (a tile's 64 lines are
            # fewer than the 128 threads)
            assert int(n_prefetch) == {"fwd": 0, "bwd": 2 * 2, "sum_rows": 0}[name], rows
        else:
            assert int(n_gdc) == 0 and meta_pdl == "False" and int(n_prefetch) == 0, rows


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("n, m", [(64, 37), (40, 9), (96, 130)])
def test_backward_tensor_descriptor_tiles_match_pointer_tiles(n, m, strided, monkeypatch):
    # TUNE["tma"]: the pipelined backward reads its tiles through tensor descriptors (rows and columns past the
    # tensor read as zero); it must give bitwise the same dx and dweight as the pointer loads
    from fat5.ops import rmsnorm as rn

    gen = torch.Generator().manual_seed(n + m)
    x, dy = (torch.randn(m, n, generator=gen).to(DEVICE) for _ in range(2))
    w = torch.randn(n, generator=gen).to(DEVICE)
    _, _, rstd = rn._rms_norm_fwd_impl(x, w, None, 1e-6, None)
    monkeypatch.setattr(rn, "TUNE", {"stages": 2, "strided": strided})
    dx, _, dw = rn._rms_norm_bwd_impl(dy, None, x, w, rstd, None)
    rn.TUNE["tma"] = True
    made = []
    real = rn.TensorDescriptor.from_tensor
    monkeypatch.setattr(rn.TensorDescriptor, "from_tensor", lambda t, b: made.append(b) or real(t, b))
    dx_t, _, dw_t = rn._rms_norm_bwd_impl(dy, None, x, w, rstd, None)
    assert len(made) == 2  # h and dy went through descriptors
    assert torch.equal(dx, dx_t) and torch.equal(dw, dw_t)


def _launches(monkeypatch, rn, name):
    """Record the keyword arguments of every launch through the module's launcher ``name`` (_FWD, _BWD, ...)."""
    seen = []
    real = getattr(rn, name)

    class Spy:
        def __getitem__(self, grid):
            launch = real[grid]

            def run(*args, **kwargs):
                seen.append(kwargs)
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(rn, name, Spy())
    return seen


def _assert_backward_repeats(shape, dtype, device, seed, calls=2):
    """The backward kernels (with the TUNE in force) give bitwise the same dx and dweight on every call."""
    from fat5.ops import rmsnorm as rn

    gen = torch.Generator().manual_seed(seed)
    x, dy = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(2))
    w = torch.randn(shape[-1], generator=gen).to(device, dtype)
    _, _, rstd = rn._rms_norm_fwd_impl(x, w, None, 1e-6, None)
    first, *others = (rn._rms_norm_bwd_impl(dy, None, x, w, rstd, None) for _ in range(calls))
    for other in others:
        assert torch.equal(first[0], other[0]) and torch.equal(first[2], other[2])


@pytest.mark.parametrize(
    "chunk, shape, dtype, r_dtype, out_dtype",
    [
        (128, (37, 300), torch.float16, None, None),  # 4 chunks of 128, the last one partly past the row
        (32, (19, 100), torch.float32, None, None),
        (64, (23, 72), torch.float16, torch.float32, torch.float16),  # the model's mixed-dtype add
    ],
)
def test_backward_chunked_rows_match_reference(chunk, shape, dtype, r_dtype, out_dtype, monkeypatch):
    # TUNE["chunk"] / ["fwd_chunk"]: the kernels hold each tile as (rows, chunks, chunk columns), so that a row's
    # sums stay in one warp; same values and gradients as the reference, and run-to-run identical
    from fat5.ops import rmsnorm as rn

    monkeypatch.setattr(rn, "TUNE", {"chunk": chunk, "fwd_chunk": chunk})
    fwd, bwd = _launches(monkeypatch, rn, "_FWD"), _launches(monkeypatch, rn, "_BWD")
    _check(shape, dtype, r_dtype is not None, device=DEVICE, r_dtype=r_dtype, out_dtype=out_dtype)
    _assert_backward_repeats(shape, dtype, DEVICE, seed=chunk)
    # every launch took the chunked form (a chunk narrower than the padded row)
    assert fwd and bwd
    assert all(k["CHUNK"] == chunk < k["BLOCK_N"] for k in fwd + bwd)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [128, 256])
@pytest.mark.parametrize("shape", [(4103, 768), (2050, 1024), (513, 4096)])
def test_backward_chunked_rows_gpu(chunk, shape, monkeypatch):
    from fat5.ops import rmsnorm as rn

    monkeypatch.setattr(rn, "TUNE", {"chunk": chunk, "fwd_chunk": chunk})
    _check(shape, torch.bfloat16, False, device="cuda")
    _check(shape, torch.bfloat16, True, device="cuda", r_dtype=torch.float32, out_dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "shape, dtype, with_residual",
    [((37, 300), torch.float16, False), ((130, 72), torch.float32, True), ((9, 40), torch.float32, False)],
)
def test_backward_strided_tiles(shape, dtype, with_residual, monkeypatch):
    # TUNE["strided"]: each backward program takes every nprog-th tile (4 programs on the CPU) instead of a band
    # of rows, the last round of tiles partly or wholly past the rows: the reference's values and gradients,
    # run-to-run identical, and dx bitwise that of the band layout (a row's gradient does not depend on which
    # program computes it; dweight sums its rows in another order)
    from fat5.ops import rmsnorm as rn

    monkeypatch.setattr(rn, "TUNE", {"strided": True})
    bwd = _launches(monkeypatch, rn, "_BWD")
    _check(shape, dtype, with_residual, device=DEVICE)
    _assert_backward_repeats(shape, dtype, DEVICE, seed=shape[0])
    assert bwd and all(k["STRIDED"] for k in bwd)
    gen = torch.Generator().manual_seed(1)
    x, dy = (torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(2))
    w = torch.randn(shape[-1], generator=gen).to(DEVICE, dtype)
    _, _, rstd = rn._rms_norm_fwd_impl(x, w, None, 1e-6, None)
    dx_s, _, dw_s = rn._rms_norm_bwd_impl(dy, None, x, w, rstd, None)
    rn.TUNE["strided"] = False
    dx_b, _, dw_b = rn._rms_norm_bwd_impl(dy, None, x, w, rstd, None)
    assert torch.equal(dx_s, dx_b)
    torch.testing.assert_close(dw_s.double(), dw_b.double(), rtol=1e-2, atol=1e-2 * shape[0] ** 0.5)


@pytest.mark.parametrize("n, strided", [(300, False), (512, False), (600, True), (3000, True)])
def test_backward_default_layout_and_release(n, strided, monkeypatch):
    # the defaults with no TUNE: strided backward tiles for rows wider than 512 (a band of rows per program up to
    # 512), and the dweight sum releasing the next kernel; the reference's values either way
    from fat5.ops import rmsnorm as rn

    monkeypatch.setattr(rn, "TUNE", {})
    bwd, sums = _launches(monkeypatch, rn, "_BWD"), _launches(monkeypatch, rn, "_SUM_ROWS")
    _check((45, n), torch.float32, False, device=DEVICE)
    assert bwd and all(k["STRIDED"] is strided for k in bwd)
    assert sums and all(k["RELEASE"] is True for k in sums)


@pytest.mark.parametrize("shape, dtype", [((37, 300), torch.float16), ((130, 72), torch.float32)])
def test_stream_hints_change_no_value(shape, dtype, monkeypatch):
    # TUNE["stream"]: cache hints on the streamed loads and stores of both kernels (evict-first, cache-streaming);
    # they reach the launches, and every output is bitwise that of the launch without them
    from fat5.ops import rmsnorm as rn

    gen = torch.Generator().manual_seed(3)
    x, r, dy = (torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(3))
    w = torch.randn(shape[-1], generator=gen).to(DEVICE, dtype)
    outs = {}
    for stream in (False, True):
        monkeypatch.setattr(rn, "TUNE", {"stream": stream})
        fwd, bwd = _launches(monkeypatch, rn, "_FWD"), _launches(monkeypatch, rn, "_BWD")
        y, h, rstd = rn._rms_norm_fwd_impl(x, w, r, 1e-6, None)
        dx, _, dw = rn._rms_norm_bwd_impl(dy, None, h, w, rstd, None)
        outs[stream] = (y, h, rstd, dx, dw)
        hints = {"EVICT": "evict_first", "STORE_CACHE": ".cs"} if stream else {}
        for k in fwd + bwd:
            assert {n: k[n] for n in ("EVICT", "STORE_CACHE") if n in k} == hints, k
        assert fwd and bwd
    for a, b in zip(outs[False], outs[True], strict=True):
        assert torch.equal(a, b)
    ref_y, ref_h = rms_norm_ref(x.double(), w.double(), 1e-6, r.double())
    torch.testing.assert_close(outs[True][1].double(), ref_h, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(outs[True][0].double(), ref_y, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize(
    "shape, dtype, with_residual", [((130, 72), torch.float32, True), ((37, 300), torch.float16, False)]
)
def test_backward_even_bands(shape, dtype, with_residual, strided, monkeypatch):
    # TUNE["even_bands"] (with "per_sm" and "maxnreg", the three-programs-per-SM setting): bands of the fewest
    # whole tiles, not a power of two of rows (130 rows over 4 programs: 40 rows each, where the power-of-two rule
    # gives 64 rows and 3 programs); the reference's values and gradients, run-to-run identical
    from fat5.ops import rmsnorm as rn

    monkeypatch.setattr(rn, "TUNE", {"even_bands": True, "per_sm": 3, "maxnreg": 168, "strided": strided})
    bwd = _launches(monkeypatch, rn, "_BWD")
    _check(shape, dtype, with_residual, device=DEVICE)
    _assert_backward_repeats(shape, dtype, DEVICE, seed=shape[0])
    assert bwd and all(k["maxnreg"] == 168 for k in bwd)
    if DEVICE == "cpu":  # 4 programs under the interpreter
        assert {k["ROWS_PER_PROGRAM"] for k in bwd} == {40 if shape[0] == 130 else 16}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4103, 768), (32768, 512), (32768, 1024), (513, 4096), (7, 512)])
def test_three_programs_per_sm_gpu(shape, monkeypatch):
    from fat5.ops import rmsnorm as rn

    monkeypatch.setattr(rn, "TUNE", {"even_bands": True, "per_sm": 3, "maxnreg": 168})
    _check(shape, torch.bfloat16, False, device="cuda")
    _check(shape, torch.bfloat16, True, device="cuda", r_dtype=torch.float32, out_dtype=torch.bfloat16)
    _assert_backward_repeats(shape, torch.bfloat16, "cuda", seed=0, calls=5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4103, 768), (32768, 512), (2050, 1024), (513, 4096)])
def test_backward_strided_tiles_gpu(shape, monkeypatch):
    from fat5.ops import rmsnorm as rn

    monkeypatch.setattr(rn, "TUNE", {"strided": True})
    _check(shape, torch.bfloat16, False, device="cuda")
    _check(shape, torch.bfloat16, True, device="cuda", r_dtype=torch.float32, out_dtype=torch.bfloat16)
    _assert_backward_repeats(shape, torch.bfloat16, "cuda", seed=0, calls=5)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "tune", [{}, {"prefetch": 3, "reduce_release": False}, {"strided": True}, {"stream": True}]
)
@pytest.mark.parametrize("shape", [(4103, 768), (32768, 512), (2050, 1024), (513, 4096), (7, 512)])
def test_l2_prefetch_gpu(shape, tune, monkeypatch):
    # TUNE["prefetch"] (default 2 tiles): L2 prefetches before the backward waits on the previous kernel (PDL);
    # the values must not change, also where the forward just wrote the h the backward prefetches (with a residual)
    from fat5.ops import rmsnorm as rn

    if not rn.pdl(torch.device("cuda")):
        pytest.skip("no programmatic dependent launch on this GPU: the prefetches are not compiled in")
    monkeypatch.setattr(rn, "TUNE", dict(tune))
    bwd, sums = _launches(monkeypatch, rn, "_BWD"), _launches(monkeypatch, rn, "_SUM_ROWS")
    _check(shape, torch.bfloat16, False, device="cuda")
    _check(shape, torch.bfloat16, True, device="cuda", r_dtype=torch.float32, out_dtype=torch.bfloat16)
    _assert_backward_repeats(shape, torch.bfloat16, "cuda", seed=0, calls=5)
    assert bwd and all(k["PREFETCH"] >= 1 and k["PDL"] for k in bwd)
    assert sums and all(k["RELEASE"] == tune.get("reduce_release", True) for k in sums)


@pytest.mark.parametrize("group", [1, 3, 16])
@pytest.mark.parametrize("shape, dtype", [((45, 72), torch.float32), ((130, 300), torch.float16)])
def test_backward_in_kernel_dweight_sum(group, shape, dtype, monkeypatch):
    # TUNE["fused_reduce"]: the backward's last programs sum dweight (groups of `group` programs, then the
    # groups; 4 programs on the CPU, so groups of 1 and 3 exercise both levels and a short last group): the
    # reference's values and gradients, bitwise the same on a second call, and the counters left at zero
    from fat5.ops import rmsnorm as rn

    monkeypatch.setattr(rn, "TUNE", {"fused_reduce": True, "group": group})
    bwd, sums = _launches(monkeypatch, rn, "_BWD"), _launches(monkeypatch, rn, "_SUM_ROWS")
    _check(shape, dtype, True, device=DEVICE)
    _assert_backward_repeats(shape, dtype, DEVICE, seed=group)
    # every backward summed dweight itself: no separate reduction was launched
    assert bwd and all(k["FUSED"] and k["GROUP"] == group for k in bwd) and not sums
    # the counters the calls used (functools.cache hands back the same tensor)
    max_groups = -(-rn._num_programs(torch.device(DEVICE)) // group)
    assert rn._counters.cache_info().currsize >= 1
    assert int(rn._counters(torch.device(DEVICE), max_groups + 1).abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4103, 768), (32768, 512), (513, 4096)])
def test_backward_in_kernel_dweight_sum_gpu(shape, monkeypatch):
    from fat5.ops import rmsnorm as rn

    monkeypatch.setattr(rn, "TUNE", {"fused_reduce": True})
    _check(shape, torch.bfloat16, False, device="cuda")
    _check(shape, torch.bfloat16, True, device="cuda", r_dtype=torch.float32, out_dtype=torch.bfloat16)
    _assert_backward_repeats(
        shape, torch.bfloat16, "cuda", seed=0, calls=20
    )  # whichever programs arrive last
