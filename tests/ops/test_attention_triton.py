"""Triton flash attention (ops/attention_triton.py) against ``attention_ref``.

Rule (DESIGN.md): the kernel's max error against the float64 reference on the same inputs must be within 2x
(values) / 3x (gradients) of the error of the same attention computed in plain PyTorch in the kernel's
dtype, plus a small floor relative to the reference's magnitude (float32 errors are near rounding).
On CPU the kernels run in the Triton interpreter (tiny shapes, float32/float16); ``gpu`` tests run bf16 on
CUDA at larger shapes. Outputs are poisoned with NaN before the kernels write them.
The inner-loop variants ("split", "table": ``at.set_variant``) are both checked. They differ only for the T5
bias, so "split" runs only the T5 cases, including ones with a small max distance W where tiles lie wholly
below -W, near the diagonal and wholly beyond +W. "split" walks near-diagonal tiles 16 keys (or queries) at a
time and "table" reads them from a Toeplitz table; they match to float32 rounding. The "table" forward with
its near tiles read as 2D blocks through a tensor descriptor (``at.TMA``) gives bitwise the results of its
per-element pointer loads in the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from fat5.ops import attention_triton as at
from fat5.ops.attention import attention_ref, build_mask, position_bias_ref
from fat5.positions import alibi_slopes, relative_position_bucket

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(at, "_POISON", True)


@pytest.fixture(params=at.VARIANTS)
def variant(request, monkeypatch):
    monkeypatch.setattr(at, "_VARIANT", request.param)
    return request.param


def _lowp_attention(
    q,
    k,
    v,
    *,
    scale=1.0,
    causal=False,
    q_offset=None,
    bias=None,
    rel_table=None,
    rel_bidirectional=True,
    rel_max_distance=128,
    alibi_slopes=None,
    key_padding_mask=None,
    q_segment_ids=None,
    kv_segment_ids=None,
):
    """Plain-PyTorch attention with every op in the inputs' dtype: the error budget for that dtype."""
    b, h, m, _ = q.shape
    n = k.shape[2]
    off = n - m if q_offset is None else q_offset
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    pos = position_bias_ref(m, n, off, q.device, rel_table, rel_bidirectional, rel_max_distance, alibi_slopes)
    if pos is not None:
        s = s + pos.to(s.dtype)
    if bias is not None:
        s = s + bias.to(s.dtype)
    mask = build_mask(b, m, n, q.device, causal, off, key_padding_mask, q_segment_ids, kv_segment_ids)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if mask is not None:
        p = p.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return torch.matmul(p, v)


def _segments(b, length, docs, gen):
    """Random packed documents (ids 0..docs-1, sorted) with a padded tail (id -1) in odd rows."""
    seg = torch.zeros(b, length, dtype=torch.int32)
    for i in range(b):
        cuts = torch.sort(torch.randint(1, max(length, 2), (docs - 1,), generator=gen)).values
        seg[i] = torch.bucketize(torch.arange(length), cuts, right=True).to(torch.int32)
        if i % 2 == 1:
            seg[i, length - length // 4 :] = -1
    return seg


def _make(case, dtype, device, gen):
    b, h, m, n, d = case["shape"]
    kw = dict(case.get("kw", {}))
    mk = lambda *s: torch.randn(*s, generator=gen).to(device)
    if case.get("views"):  # (B, L, H, D) storage seen as (B, H, L, D): strided inputs, no copy
        q, k, v = (mk(b, x, h, d).transpose(1, 2) for x in (m, n, n))
    else:
        q, k, v = mk(b, h, m, d), mk(b, h, n, d), mk(b, h, n, d)
    q = q * 0.5  # scores of order a few: a softmax that is neither flat nor one-hot
    leaves = {"q": q, "k": k, "v": v}
    bias_kind = case.get("bias")
    if bias_kind == "t5":
        leaves["rel_table"] = mk(case.get("buckets", 32), h)
    elif bias_kind == "alibi":
        kw["alibi_slopes"] = alibi_slopes(h).to(device)
    elif bias_kind is not None:  # a broadcast shape of the dense bias
        bshape = {"1HMN": (1, h, m, n), "B1MN": (b, 1, m, n), "BHMN": (b, h, m, n)}[bias_kind]
        leaves["bias"] = mk(*bshape)
    if case.get("kpm"):
        kpm = torch.rand(b, n, generator=gen) > 0.3
        kpm[0, 0] = True
        if b > 1:
            kpm[-1] = False  # a batch row with no real key at all: every query of it sees nothing
        kw["key_padding_mask"] = kpm.to(device)
    if case.get("seg_ids"):  # explicit (query ids, key ids), each a list per batch row
        q_ids, kv_ids = (torch.tensor(x, dtype=torch.int32).to(device) for x in case["seg_ids"])
        assert q_ids.shape == (b, m) and kv_ids.shape == (b, n)
        kw["q_segment_ids"], kw["kv_segment_ids"] = q_ids, kv_ids
    if case.get("seg"):
        assert m == n
        seg = _segments(b, n, case["seg"], gen).to(device)
        kw["q_segment_ids"], kw["kv_segment_ids"] = seg, seg
    if "q_offset" in case:
        off = case["q_offset"]
        kw["q_offset"] = torch.tensor(off[1], device=device) if isinstance(off, tuple) else off
    leaves = {name: t.to(dtype).detach().requires_grad_(True) for name, t in leaves.items()}
    # the position table stays float32 (as a model keeps it), only activations are low precision
    if "rel_table" in leaves:
        leaves["rel_table"] = leaves["rel_table"].detach().float().requires_grad_(True)
    return leaves, kw


def _call(fn, leaves, kw, dtype_cast=None):
    args = {
        name: (t if dtype_cast is None else t.detach().to(dtype_cast).requires_grad_(True))
        for name, t in leaves.items()
    }
    extra = {key: val for key, val in kw.items()}
    if dtype_cast is not None and "alibi_slopes" in extra:
        extra["alibi_slopes"] = extra["alibi_slopes"].to(dtype_cast)
    out = fn(args["q"], args["k"], args["v"], **{n: t for n, t in args.items() if n not in "qkv"}, **extra)
    return out, args


def _check(case, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    leaves, kw = _make(case, dtype, device, gen)
    out, args = _call(at.flash_attention, leaves, kw)
    assert out.dtype == dtype and out.shape == leaves["q"].shape
    grad_out = torch.randn(out.shape, generator=gen).to(device=device, dtype=dtype)
    names = list(args)
    grads = torch.autograd.grad(out, [args[n] for n in names], grad_out)

    ref, rargs = _call(attention_ref, leaves, kw, dtype_cast=torch.float64)
    rgrads = torch.autograd.grad(ref, [rargs[n] for n in names], grad_out.double())
    low, largs = _call(_lowp_attention, leaves, kw)
    lgrads = torch.autograd.grad(low, [largs[n] for n in names], grad_out)

    floor = 1e-5 if dtype == torch.float32 else 1e-4

    def ok(x, r, lp, factor, what):
        assert torch.isfinite(x).all(), f"{what}: non-finite values (unwritten output?)"
        err = (x.double() - r).abs().max().item()
        err_lp = (lp.double() - r).abs().max().item()
        tol = factor * err_lp + floor * max(r.abs().max().item(), 1.0)
        assert err <= tol, (
            f"{what}: kernel error {err:.3g} > {tol:.3g} (plain torch in {dtype}: {err_lp:.3g})"
        )

    ok(out, ref, low, 2.0, "out")
    for name, g, rg, lg in zip(names, grads, rgrads, lgrads):
        ok(g, rg, lg, 3.0, f"d{name}")


# name -> (shape (B, H, M, N, D), options); small awkward shapes for the interpreter
CASES = {
    "plain": dict(shape=(1, 1, 37, 70, 32)),
    "plain_views_d64": dict(shape=(2, 1, 19, 64, 64), views=True),
    "decode_m1": dict(shape=(2, 1, 1, 19, 32), kw=dict(causal=True)),
    "n1": dict(shape=(1, 1, 5, 1, 32)),
    "causal_bottom_right": dict(shape=(1, 1, 37, 64, 32), kw=dict(causal=True)),
    "causal_square": dict(shape=(1, 1, 70, 70, 64), kw=dict(causal=True)),
    "t5_bidir": dict(shape=(1, 2, 21, 130, 32), bias="t5", kw=dict(rel_max_distance=24)),
    "t5_bidir_d64_default_dist": dict(shape=(2, 2, 5, 64, 64), bias="t5"),
    "t5_causal": dict(
        shape=(1, 2, 70, 70, 32),
        bias="t5",
        kw=dict(causal=True, rel_bidirectional=False, rel_max_distance=20),
    ),
    "alibi_causal": dict(shape=(2, 2, 5, 64, 32), bias="alibi", kw=dict(causal=True)),
    "bias_1HMN": dict(shape=(2, 2, 19, 37, 32), bias="1HMN"),
    "bias_B1MN_causal": dict(shape=(2, 2, 19, 37, 32), bias="B1MN", kw=dict(causal=True)),
    "bias_BHMN_kpm": dict(shape=(2, 2, 19, 37, 32), bias="BHMN", kpm=True),
    "kpm_full_row_masked": dict(shape=(2, 1, 5, 37, 32), kpm=True),
    "segments": dict(shape=(2, 1, 70, 70, 32), seg=4),
    "segments_causal_t5": dict(
        shape=(2, 2, 64, 64, 32), seg=3, bias="t5", kw=dict(causal=True, rel_max_distance=16)
    ),
    "kpm_causal_alibi": dict(shape=(2, 2, 37, 37, 32), bias="alibi", kpm=True, kw=dict(causal=True)),
    "q_offset_int_rows_empty": dict(
        shape=(1, 2, 37, 64, 32), q_offset=-3, bias="t5", kw=dict(causal=True, rel_max_distance=16)
    ),
    "q_offset_tensor": dict(
        shape=(2, 2, 5, 64, 32),
        q_offset=("t", 40),
        bias="t5",
        kw=dict(causal=True, rel_bidirectional=False, rel_max_distance=24),
    ),
    # W = max(max distance, buckets) = 8 with 16-wide blocks: far tiles on both sides of the near band
    "t5_near_far": dict(shape=(1, 2, 100, 130, 16), bias="t5", buckets=8, kw=dict(rel_max_distance=8)),
    "t5_near_far_causal_kpm": dict(
        shape=(2, 1, 130, 130, 16),
        bias="t5",
        buckets=8,
        kpm=True,
        kw=dict(causal=True, rel_bidirectional=False, rel_max_distance=8),
    ),
    "t5_near_far_segments": dict(
        shape=(2, 1, 96, 96, 16), seg=3, bias="t5", buckets=8, kw=dict(rel_max_distance=8)
    ),
    "t5_near_far_q_offset": dict(
        shape=(1, 2, 70, 33, 16), q_offset=-20, bias="t5", buckets=8, kw=dict(rel_max_distance=8)
    ),
}
T5_CASES = [name for name, case in CASES.items() if case.get("bias") == "t5"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype, variant):
    if DEV == "cuda":
        pytest.skip("interpreter-sized case; the gpu tests cover CUDA")
    if variant != "table" and name not in T5_CASES:
        pytest.skip("the variants differ only with a T5 bias")
    _check(CASES[name], dtype, DEV)


@pytest.mark.parametrize("name", [n for n in T5_CASES if "near_far" in n] + ["segments_causal_t5"])
def test_variants_agree(name, monkeypatch):
    """The split loops compute the same function with narrower near-diagonal tiles: equal to fp32 rounding."""
    if DEV == "cuda":
        pytest.skip("interpreter-sized case")
    results = []
    for v in at.VARIANTS:
        monkeypatch.setattr(at, "_VARIANT", v)
        gen = torch.Generator().manual_seed(4)
        leaves, kw = _make(CASES[name], torch.float32, DEV, gen)
        out, args = _call(at.flash_attention, leaves, kw)
        grads = torch.autograd.grad(out, list(args.values()), torch.randn(out.shape, generator=gen))
        results.append((out, *grads))
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert not torch.equal(x, torch.zeros_like(x))
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def _doc_ranges_loops(outer, inner):
    """Plain-loop reference of the document tables: per batch row and 16-element group of ``outer``, the range
    [lo, hi) of ``inner`` when the group's elements share one id whose elements in ``inner`` are exactly lo..hi-1,
    else (-1, -1)."""
    b, length = outer.shape
    groups = -(-length // 16)
    lo = torch.full((b, groups), -1, dtype=torch.int32)
    hi = torch.full((b, groups), -1, dtype=torch.int32)
    for i in range(b):
        for g in range(groups):
            ids = set(outer[i, g * 16 : (g + 1) * 16].tolist())
            if len(ids) != 1:
                continue
            (doc,) = ids
            where = [j for j, x in enumerate(inner[i].tolist()) if x == doc]
            if where and where == list(range(where[0], where[-1] + 1)):
                lo[i, g], hi[i, g] = where[0], where[-1] + 1
    return lo, hi


@pytest.mark.parametrize("m,n", [(96, 96), (37, 70), (1, 33), (130, 17), (200, 200)])
def test_segment_ranges_kernel_equals_reference(m, n):
    """The device-side tile-skipping tables: one kernel against the torch reference, on packed rows, ids out of
    order (a document split in two places) and lengths that are not multiples of the 16-element groups; the
    document tables of the document pass against plain loops, with documents long enough to fill groups,
    documents split in two runs and ids absent from the other side."""
    gen = torch.Generator().manual_seed(m * 1000 + n)
    for trial in range(5):
        if trial == 0:
            q_seg, kv_seg = _segments(3, m, 4, gen), _segments(3, n, 4, gen)
        elif trial == 3:
            q_seg, kv_seg = _segments(3, m, 2, gen), _segments(3, n, 2, gen)
        elif trial == 4:  # one document split in two runs (id 0 again at the end), an id only in queries
            q_seg = _segments(3, m, 3, gen)
            kv_seg = _segments(3, n, 3, gen)
            kv_seg[:, -(n // 5) :] = 0
            q_seg[0] = 7
        else:
            q_seg = torch.randint(0, 4, (3, m), generator=gen)
            kv_seg = torch.sort(torch.randint(0, 4, (3, n), generator=gen), dim=1).values
        got = at._segment_ranges(q_seg.to(DEV), kv_seg.to(DEV), m, n)
        want = at._segment_ranges_ref(q_seg.to(DEV), kv_seg.to(DEV), m, n)
        docs = (*_doc_ranges_loops(q_seg, kv_seg), *_doc_ranges_loops(kv_seg, q_seg))
        for x, y, doc in zip(got, want, docs):
            assert x.dtype == torch.int32 and x.shape == (2, *y.shape)
            assert torch.equal(x[0], y), (x[0], y)
            assert torch.equal(x[1].cpu(), doc), (x[1], doc)


@pytest.mark.parametrize("fwd_variant,bwd_variant", [("table", "split"), ("split", "table")])
def test_variant_changed_between_forward_and_backward(fwd_variant, bwd_variant, monkeypatch):
    """The backward reads the distance buffer the forward saved, whose layout depends on the forward's variant:
    switching variants in between must still give the gradients of a single-variant run."""
    if DEV == "cuda":
        pytest.skip("interpreter-sized case")
    case = CASES["t5_near_far"]
    results = []
    for switch in (False, True):
        monkeypatch.setattr(at, "_VARIANT", fwd_variant)
        gen = torch.Generator().manual_seed(6)
        leaves, kw = _make(case, torch.float32, DEV, gen)
        out, args = _call(at.flash_attention, leaves, kw)
        if switch:
            monkeypatch.setattr(at, "_VARIANT", bwd_variant)
        results.append(torch.autograd.grad(out, list(args.values()), torch.randn(out.shape, generator=gen)))
    for x, y in zip(*results):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("near", [16, 64], ids=["near16", "near_full"])
@pytest.mark.parametrize(
    "shape, q_offset",
    [((1, 2, 300, 576, 64), None), ((1, 1, 600, 130, 64), None), ((1, 2, 40, 600, 64), 20)],
    ids=["m<n", "m>n", "int_offset"],
)
def test_table_variant_large_blocks(shape, q_offset, near, monkeypatch):
    """The GPU's block sizes (forward / dq 128x64, dk/dv 64x128) with queries at an offset that is not a
    multiple of the key block: the near-diagonal loops then reach steps wholly beyond +-W, whose Toeplitz
    table rows fall outside the table (read out of bounds before the row was clamped). The interpreter's
    default blocks are too small to reach them, so this test swaps in the large ones, with near-diagonal
    steps of 16 and of whole blocks (at.NEAR)."""
    if DEV == "cuda":
        pytest.skip("interpreter case; the gpu tests run these blocks")
    monkeypatch.setattr(at, "_VARIANT", "table")
    monkeypatch.setattr(at._fwd_kernel, "configs", [at._cfg(128, 64, 1, 1)])
    monkeypatch.setattr(at._dkv_kernel, "configs", [at._cfg(64, 128, 1, 1)])
    monkeypatch.setattr(at._dq_kernel, "configs", [at._cfg(128, 64, 1, 1)])
    monkeypatch.setattr(at, "NEAR", {"fwd": near, "dkv": near, "dq": near})  # 64: near steps of whole blocks
    case = dict(shape=shape, bias="t5")
    if q_offset is not None:
        case["q_offset"] = q_offset
    _check(case, torch.float32, DEV)


@pytest.mark.parametrize("circ", [0, 1, 2, 3], ids=["copy", "per_step", "deferred", "rotated"])
@pytest.mark.parametrize("blocks", ["interpreter", "64x128"])
@pytest.mark.parametrize("name", T5_CASES)
def test_circular_skew_matches_reference(name, blocks, circ, monkeypatch):
    """The dk/dv near tiles' table gradient through each skew (CIRC_SKEW 0: a skewed copy; 1: circular, summed
    per step; 2: circular, kept per thread and distance class until the loop ends; 3, the default: as 2 through a
    step-independent gather with rotated row sums) against float64: the interpreter's 32x32 blocks (near
    steps of 16 queries, so a step narrower than its block, and the square last tiles), and the GPU's 64-query
    x 128-key blocks with 32-query near steps."""
    if DEV == "cuda":
        pytest.skip(
            "interpreter case; the gpu tests run the default, and the others with FAT5_ATTN_CIRC_SKEW"
        )
    monkeypatch.setattr(at, "_VARIANT", "table")
    monkeypatch.setattr(at, "CIRC_SKEW", circ)
    if blocks == "64x128":
        monkeypatch.setattr(at._dkv_kernel, "configs", [at._cfg(64, 128, 1, 1)])
        monkeypatch.setattr(at, "NEAR", {**at.NEAR, "dkv": 32})
    _check(CASES[name], torch.float32, DEV)


def _table_grad_with(circ, case, device, dtype, monkeypatch):
    monkeypatch.setattr(at, "CIRC_SKEW", circ)
    return _table_grad(case, device, dtype)


@pytest.mark.parametrize("blocks", ["interpreter", "64x128"])
@pytest.mark.parametrize(
    "case",
    [
        dict(shape=(1, 2, 150, 150, 16), bias="t5", kw=dict(rel_max_distance=40)),
        dict(
            shape=(2, 1, 67, 190, 16),
            bias="t5",
            kw=dict(rel_max_distance=24, rel_bidirectional=False, causal=True),
        ),
        dict(shape=(1, 2, 40, 130, 16), bias="t5", kw=dict(rel_max_distance=32), q_offset=-23),
        dict(shape=(1, 1, 45, 150, 16), bias="t5", kw=dict(rel_max_distance=32), q_offset=71),
    ],
    ids=["square", "causal-decoder", "negative-offset", "offset"],
)
def test_rotated_skew_sums_as_deferred(case, blocks, monkeypatch):
    """CIRC_SKEW 3 adds the same elements in the same order as 2, only gathered and rotated differently: the
    table gradients are bitwise equal (queries at positive and negative offsets move the rotation off 0)."""
    if DEV == "cuda":
        pytest.skip("interpreter case; test_rotated_skew_sums_as_deferred_gpu runs the GPU's blocks")
    monkeypatch.setattr(at, "_VARIANT", "table")
    if blocks == "64x128":
        monkeypatch.setattr(at._dkv_kernel, "configs", [at._cfg(64, 128, 1, 1)])
        monkeypatch.setattr(at, "NEAR", {**at.NEAR, "dkv": 32})
    g2, g3 = (_table_grad_with(c, case, DEV, torch.float32, monkeypatch) for c in (2, 3))
    assert g2.abs().sum() > 0
    assert torch.equal(g2, g3)


def test_circular_skew_rejects_unknown_values(monkeypatch):
    monkeypatch.setattr(at, "CIRC_SKEW", 4)
    case = dict(shape=(1, 1, 20, 20, 16), bias="t5", kw=dict(rel_max_distance=16))
    with pytest.raises(ValueError, match="CIRC_SKEW"):
        _table_grad(case, DEV, torch.float32)


# ------------------------------------------------------------------ near bias through a tensor descriptor (TMA)
def _near_rows(qp0, lo, end, w, bm, bn, near):
    """Table rows (lowest, highest) the forward's near steps read for a query block starting at position qp0
    whose main loop covers key blocks [lo, end), or None without near steps: the host mirror of _split_bounds
    and of _fwd_inner's near loop (rows qp0 + i - s + W + 2 NT_COLS, s a step's first key)."""
    first_near, first_far = qp0 - w - bn + 2, qp0 + bm - 1 + w
    e1 = lo + (max(first_near - lo, 0) + bn - 1) // bn * bn
    e2 = lo + (max(first_far - lo, 0) + bn - 1) // bn * bn
    e1 = min(e1, max(end, lo))
    e2 = min(max(e2, e1), max(end, lo))
    if e2 <= e1:
        return None
    assert (e2 - e1) % near == 0
    last = e2 - near
    k2 = 2 * at.NT_COLS.value
    return qp0 - last + w + k2, qp0 + bm - 1 - e1 + w + k2


@pytest.mark.parametrize("w", [1, 8, 17, 92, 114, 128])
def test_fwd_near_rows_stay_in_table(w):
    """With the near bias read as one 2D block (TMA) no row is clamped: every row a forward near step reads
    must lie in its head's Toeplitz table, for every forward config (the GPU's and the interpreter's), near
    steps of 32 and 64 keys, any query position and loop range. The extremes are those of ``_nt_rows``'s
    argument, and the lead rows are needed (the 128-row configs read rows below NT_COLS)."""
    k = at.NT_COLS.value
    rows = at._nt_rows(w)
    assert at._rel_width(w, True) % k == 0
    assert at._rel_index.fn(torch.arange(2 * w + 1), w).numel() == at._rel_width(w, True)
    blocks = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in at._FWD_CONFIGS_GPU + at._FWD_CONFIGS}
    lowest = rows
    for bm, bn in sorted(blocks):
        for near in (32, 64):
            near = min(near, bn)
            lo_seen, hi_seen = rows, -1
            for qp0 in range(-w - 3 * bn - bm, w + 3 * bn + bm):
                for end in [j * bn for j in range(0, (2 * w + 4 * bn + bm) // bn + 2)]:
                    r = _near_rows(qp0, 0, end, w, bm, bn, near)
                    if r is not None:
                        assert 0 <= r[0] <= r[1] < rows, (bm, bn, near, qp0, end, r)
                        lo_seen, hi_seen = min(lo_seen, r[0]), max(hi_seen, r[1])
            # the bounds of the argument in _nt_rows are reached
            assert lo_seen == 2 * k + near + 2 - bm - bn, (bm, bn, near, lo_seen)
            assert hi_seen == 2 * k + 2 * w + bm + bn - 3, (bm, bn, near, hi_seen)
            lowest = min(lowest, lo_seen)
    assert lowest < k


def _forward_runs(case, dtype, monkeypatch, tma):
    """out and lse of the forward on ``case`` with the near bias read through a descriptor or not; also whether
    the launch asked for TMA, and the row (of the head's table) each descriptor load of the interpreter
    started at."""
    from triton.runtime import interpreter

    monkeypatch.setattr(at, "TMA", tma)
    got, rows = [], []
    forward = at._forward

    def fwd(q, k, v, a):
        got.append((forward(q, k, v, a), a.rbw))
        return got[-1][0]

    monkeypatch.setattr(at, "_forward", fwd)
    flags = _spy_fwd_flag(monkeypatch, "TMA")
    load = interpreter.InterpreterBuilder.create_descriptor_load

    def counted(self, desc, indices, *args):
        rows.append(int(indices[0].data.reshape(-1)[0]))
        return load(self, desc, indices, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_descriptor_load", counted)
    gen = torch.Generator().manual_seed(11)
    leaves, kw = _make(case, dtype, DEV, gen)
    with torch.no_grad():
        _call(at.flash_attention, leaves, kw)
    (out, lse), rbw = got[-1]
    return out, lse, flags[-1], [r % (rbw // at.NT_COLS.value) for r in rows]


TMA_CASES = [
    "t5_bidir",
    "t5_causal",
    "t5_near_far",
    "t5_near_far_causal_kpm",
    "t5_near_far_segments",
    "segments_causal_t5",
    "t5_near_far_q_offset",
    "q_offset_tensor",
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", TMA_CASES)
def test_tma_forward_matches_pointer_path(name, dtype, monkeypatch):
    """The forward with the near bias loaded through a tensor descriptor (at.TMA) gives bitwise the output and
    logsumexp of the per-element pointer path, with the same near steps: M != N, odd lengths, causal, key
    padding, segments (with and without the document pass), an int and a tensor query offset (decode-sized
    blocks of 5 queries)."""
    if DEV == "cuda":
        pytest.skip("interpreter case; test_tma_forward_gpu runs the GPU")
    monkeypatch.setattr(at, "_VARIANT", "table")
    for doc_pass in (False, True) if "seg" in CASES[name] else (True,):
        monkeypatch.setattr(at, "DOC_PASS", doc_pass)
        out0, lse0, flag0, rows0 = _forward_runs(CASES[name], dtype, monkeypatch, False)
        out1, lse1, flag1, rows1 = _forward_runs(CASES[name], dtype, monkeypatch, True)
        assert not flag0 and not rows0 and flag1
        # the small documents of the segment cases leave the document pass no near step of the main loops
        assert rows1 or doc_pass and "seg" in CASES[name]
        assert torch.isfinite(out1).all()
        assert torch.equal(out0, out1) and torch.equal(lse0, lse1)


@pytest.mark.parametrize("near", [32, 64])
@pytest.mark.parametrize("block", [(128, 128), (128, 64)], ids=["128x128", "128x64"])
@pytest.mark.parametrize(
    "shape, q_offset, causal",
    [
        ((1, 2, 300, 600, 32), 38, False),
        ((1, 2, 300, 576, 32), None, False),
        ((1, 1, 5, 600, 32), ("t", 300), False),
        ((1, 2, 257, 257, 32), None, True),
    ],
    ids=["offset38", "m<n", "decode_tensor_offset", "causal"],
)
def test_tma_forward_large_blocks(shape, q_offset, causal, block, near, monkeypatch):
    """The GPU's 128-row forward blocks with near steps of 32 and 64 keys, TMA against pointers (bitwise). With
    W = 92 (32 buckets, max distance 128) and queries at offset 38, qp0 + W + BLOCK_M - 1 lies one past a key
    block start: the last near step is the furthest beyond +W there can be, and reads the lowest table row of
    the bound in _nt_rows (below NT_COLS, in the lead rows, for all but 128x64 at 64: what a clamped pointer
    load hides and a 2D block load cannot)."""
    if DEV == "cuda":
        pytest.skip("interpreter case; the gpu tests run these blocks")
    monkeypatch.setattr(at, "_VARIANT", "table")
    monkeypatch.setattr(at._fwd_kernel, "configs", [at._cfg(*block, 1, 1)])
    monkeypatch.setattr(at, "NEAR", {**at.NEAR, "fwd": near})
    case = dict(shape=shape, bias="t5", kw=dict(causal=causal, rel_bidirectional=not causal))
    if q_offset is not None:
        case["q_offset"] = q_offset
    out0, lse0, _, _ = _forward_runs(case, torch.float32, monkeypatch, False)
    out1, lse1, flag, rows = _forward_runs(case, torch.float32, monkeypatch, True)
    assert flag and rows
    if q_offset == 38:
        k = at.NT_COLS.value
        assert min(rows) == 2 * k + near + 2 - sum(block), rows
    assert torch.equal(out0, out1) and torch.equal(lse0, lse1)


@pytest.mark.parametrize("causal", [False, True])
def test_segments_with_wide_blocks(causal, monkeypatch):
    """Packed documents with the GPU's 128-row forward / dq blocks and 128-key dk/dv blocks in the interpreter:
    the last block of 300 rows holds 3 of its 8 16-row segment groups, so the block's key (query) range is taken
    over groups past the last one (clamped to it: ``_group_span``); checked against the float64 reference."""
    if DEV == "cuda":
        pytest.skip("interpreter case")
    monkeypatch.setattr(at._fwd_kernel, "configs", [at._cfg(128, 64, 1, 1)])
    monkeypatch.setattr(at._dq_kernel, "configs", [at._cfg(128, 64, 1, 1)])
    monkeypatch.setattr(at._dkv_kernel, "configs", [at._cfg(64, 128, 1, 1)])
    case = dict(shape=(2, 1, 300, 300, 16), seg=5, bias="t5", buckets=8, kw=dict(rel_max_distance=8))
    case["kw"].update(causal=causal, rel_bidirectional=not causal)
    _check(case, torch.float32, DEV)


def _runs(*pairs):
    """A row of segment ids from (id, length) pairs."""
    return [i for i, n in pairs for _ in range(n)]


DOC_LAYOUTS = {
    # documents starting inside a 64-key tile (100) and on one (256): blocks of one document in both passes
    "unaligned": ([_runs((0, 100), (1, 300)), _runs((0, 256), (1, 144))],) * 2,
    # id 0 in two runs: its blocks are not one exact document and stay with the masked pass
    "split_id": ([_runs((0, 100), (1, 200), (0, 100)), _runs((5, 130), (6, 270))],) * 2,
    # cross attention, M != N (queries at an offset when causal), the key document starting at 150
    "cross": (
        [_runs((0, 120), (1, 180)), _runs((0, 300))],
        [_runs((0, 150), (1, 250)), _runs((0, 10), (1, 390))],
    ),
}


@pytest.mark.parametrize("doc_pass", [True, False], ids=["doc_pass", "masked_only"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", list(DOC_LAYOUTS))
def test_document_pass(layout, causal, doc_pass, monkeypatch):
    """Packed documents with the GPU's blocks in the interpreter, against the float64 reference (values and every
    gradient): blocks of one document run without per-key ids (SEG_PASS 1: the forward's first tile masked
    below the document when it starts inside one, dq and dk/dv from the document's first row), the others with
    them (SEG_PASS 2); with the document pass off, every block takes the masked path."""
    if DEV == "cuda":
        pytest.skip("interpreter case")
    monkeypatch.setattr(at._fwd_kernel, "configs", [at._cfg(128, 64, 1, 1)])
    monkeypatch.setattr(at._dq_kernel, "configs", [at._cfg(128, 64, 1, 1)])
    monkeypatch.setattr(at._dkv_kernel, "configs", [at._cfg(64, 128, 1, 1)])
    monkeypatch.setattr(at, "DOC_PASS", doc_pass)
    q_ids, kv_ids = DOC_LAYOUTS[layout]
    m, n = len(q_ids[0]), len(kv_ids[0])
    # the layout has blocks of one document on both sides (what the document pass runs)
    tables = at._segment_ranges(torch.tensor(q_ids), torch.tensor(kv_ids), m, n)
    one_q = [(tables[0][1][0, g : g + 8] >= 0).all() for g in range(0, tables[0].shape[2], 8)]
    one_k = [(tables[2][1][0, g : g + 8] >= 0).all() for g in range(0, tables[2].shape[2], 8)]
    assert any(one_q) and any(one_k)
    passes = _spy_fwd_flag(monkeypatch, "SEG_PASS")
    case = dict(
        shape=(2, 1, m, n, 16),
        bias="t5",
        buckets=8,
        seg_ids=(q_ids, kv_ids),
        kw=dict(rel_max_distance=8, causal=causal, rel_bidirectional=not causal),
    )
    _check(case, torch.float32, DEV)
    assert passes == ([1, 2] if doc_pass else [0])


def _spy_fwd_flag(monkeypatch, flag):
    """The values of a forward launch's keyword ``flag``, one per launch, recorded from now on."""
    seen, launch = [], at._FWD.run

    def run(grid, *args, **kwargs):
        seen.append(kwargs[flag])
        return launch(grid, *args, **kwargs)

    monkeypatch.setattr(at._FWD, "run", run)
    return seen


def _kv_tma_runs(case, dtype, monkeypatch, on):
    """out, lse and the gradients of the forward on ``case`` with keys and values read through tensor
    descriptors or not, and the KV_TMA flag of each forward launch."""
    monkeypatch.setattr(at, "KV_TMA", on)
    flags = _spy_fwd_flag(monkeypatch, "KV_TMA")
    gen = torch.Generator().manual_seed(12)
    leaves, kw = _make(case, dtype, DEV, gen)
    out, args = _call(at.flash_attention, leaves, kw)
    grads = torch.autograd.grad(out, list(args.values()), torch.randn(out.shape, generator=gen).to(dtype))
    monkeypatch.undo()
    return out.detach(), grads, flags


@pytest.mark.parametrize("variant_name", ["table", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "name",
    [
        "plain",
        "plain_views_d64",
        "decode_m1",
        "n1",
        "causal_bottom_right",
        "t5_bidir",
        "t5_causal",
        "alibi_causal",
        "bias_BHMN_kpm",
        "kpm_full_row_masked",
        "segments_causal_t5",
        "q_offset_tensor",
        "t5_near_far",
        "t5_near_far_causal_kpm",
        "t5_near_far_segments",
        "t5_near_far_q_offset",
    ],
)
def test_kv_tma_forward_matches_pointer_path(name, dtype, variant_name, monkeypatch):
    """Keys and values read through tensor descriptors (at.KV_TMA: zero fill past N) give bitwise the output and
    gradients of the masked pointer loads: odd lengths, M != N, strided (B, L, H, D) views, every bias and mask
    kind, offsets, and the near steps of both variants (their descriptors are the narrower blocks)."""
    if DEV == "cuda":
        pytest.skip("interpreter case; test_kv_tma_forward_gpu runs the GPU")
    monkeypatch.setattr(at, "_VARIANT", variant_name)
    out0, g0, flags0 = _kv_tma_runs(CASES[name], dtype, monkeypatch, False)
    monkeypatch.setattr(at, "_VARIANT", variant_name)
    out1, g1, flags1 = _kv_tma_runs(CASES[name], dtype, monkeypatch, True)
    launches = 2 if "seg" in CASES[name] else 1  # the document pass and the rest
    assert flags0 == [False] * launches and flags1 == [True] * launches
    assert torch.isfinite(out1).all()
    assert torch.equal(out0, out1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


def _spy_rbv_dtype(monkeypatch):
    """dtype of the T5 bias buffer of every forward from now on."""
    seen, forward = [], at._forward

    def fwd(q, k, v, a):
        seen.append(a.rbv.dtype)
        return forward(q, k, v, a)

    monkeypatch.setattr(at, "_forward", fwd)
    return seen


@pytest.mark.parametrize("half", [True, False], ids=["fp16_table", "fp32_table"])
@pytest.mark.parametrize("variant_name", ["table", "split"])
@pytest.mark.parametrize("name", T5_CASES)
def test_half_table_matches_reference(name, variant_name, half, monkeypatch):
    """fp16 activations with the T5 bias buffer in fp16 (at.HALF_TABLE, the default) and in fp32: output and
    every gradient (the table's included) within the error rule against the float64 reference, and the buffer
    had the asked dtype."""
    if DEV == "cuda":
        pytest.skip("interpreter case; test_half_table_gpu runs the GPU")
    monkeypatch.setattr(at, "_VARIANT", variant_name)
    monkeypatch.setattr(at, "HALF_TABLE", half)
    dtypes = _spy_rbv_dtype(monkeypatch)
    _check(CASES[name], torch.float16, DEV)
    assert dtypes and set(dtypes) == {torch.float16 if half else torch.float32}


def test_half_table_values_and_dtypes(monkeypatch):
    """The fp16 buffer holds the fp32 buffer's values rounded to fp16; fp32 activations keep the fp32 buffer
    even with the flag on; the fake kernel (torch.compile) announces the dtype the real forward returns."""
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(32, 3, generator=gen) * 4
    idx = torch.randint(0, 32, (300,), generator=gen)
    full = at._rel_vector(table, idx)
    assert full.dtype == torch.float32
    torch.testing.assert_close(full, table[idx].t() * at.LOG2E, rtol=1e-6, atol=0)
    half = at._rel_vector(table, idx, torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, full.half())
    big = table.clone()
    big[idx[:3]] = torch.tensor([1e6, -1e6, 3e4])[:, None]  # past fp16's range (times log2 e) and within it
    got = at._rel_vector(big, idx, torch.float16)
    want = (big[idx].t() * at.LOG2E).clamp(-65504, 65504).half()
    assert torch.isfinite(got).all() and torch.equal(got, want)
    monkeypatch.setattr(at, "HALF_TABLE", True)
    assert at._rbv_dtype(torch.bfloat16) == at._rbv_dtype(torch.float16) == torch.float16
    assert at._rbv_dtype(torch.float32) == torch.float32
    q = torch.randn(1, 3, 20, 16, generator=gen)
    for dtype in (torch.float32, torch.float16):
        x = q.to(dtype)
        args = (x, x, x, 1.0, False, 0, None, None, table, True, 128, None, None, None, None)
        real = at._fwd_impl(*args)
        fake = at._fwd_fake(*args)
        assert real[2].dtype == fake[2].dtype == at._rbv_dtype(dtype)
        assert real[2].shape == fake[2].shape


def test_kv_tma_needs_aligned_strides(monkeypatch):
    """A key or value tensor whose rows or base are not 16-byte aligned (here D = 12 in fp32 views of a
    (B, L, H, 12) buffer with an odd offset) is read through pointers even with the flag on, and is right."""
    if DEV == "cuda":
        pytest.skip("interpreter case")
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(1 + 2 * 9 * 2 * 12, generator=gen)
    kv = base[1:].view(2, 9, 2, 12).transpose(1, 2)  # base 4 bytes past an aligned address
    q = torch.randn(2, 2, 5, 12, generator=gen)
    assert not at._kv_tma_ok(kv)
    assert at._kv_tma_ok(torch.randn(2, 2, 9, 12))  # rows of 48 bytes, batch and head strides aligned
    assert not at._kv_tma_ok(torch.randn(2, 2, 9, 6))  # fp32 rows of 24 bytes
    monkeypatch.setattr(at, "KV_TMA", True)
    flags = _spy_fwd_flag(monkeypatch, "KV_TMA")
    out = at.flash_attention(q, kv, kv)
    assert flags == [False]
    torch.testing.assert_close(out, attention_ref(q, kv, kv), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["alibi_causal", "bias_BHMN_kpm", "plain", "t5_bidir"])
def test_tma_flag_without_table(name, monkeypatch):
    """With the flag on, a launch without the Toeplitz table (no T5 bias, or the "split" variant) does not ask
    for a descriptor and gives the results of the flag off."""
    if DEV == "cuda":
        pytest.skip("interpreter case")
    monkeypatch.setattr(at, "_VARIANT", "split")
    out0, lse0, _, _ = _forward_runs(CASES[name], torch.float32, monkeypatch, False)
    out1, lse1, flag, rows = _forward_runs(CASES[name], torch.float32, monkeypatch, True)
    assert not flag and not rows
    assert torch.equal(out0, out1) and torch.equal(lse0, lse1)


def test_tma_scratch_allocator():
    """The descriptor's scratch allocator is installed where none is set (a fresh thread's context), and a
    user's allocator is kept."""
    import contextvars

    import triton
    from triton.runtime import _allocation

    def user_set():
        user = lambda size, alignment, stream: None  # noqa: E731
        triton.set_allocator(user)
        at._scratch_allocator()
        assert _allocation._allocator.get() is user

    def none_set():
        _allocation._allocator.set(_allocation._NULL_ALLOCATOR)
        at._scratch_allocator()
        assert _allocation._allocator.get() is at._tma_scratch

    contextvars.copy_context().run(user_set)
    contextvars.copy_context().run(none_set)


def test_tma_needs_hopper(monkeypatch):
    """Below compute capability 9 the forward keeps per-element pointers (Triton would lower the descriptor to
    them anyway); off CUDA (the interpreter, offline compiles) the descriptor path is allowed."""
    has_tma = at._has_tma.__wrapped__
    for cap, want in (((8, 0), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev, cap=cap: cap)
        assert has_tma(torch.device("cuda", 0)) is want
    assert has_tma(torch.device("cpu"))


def test_reference_keeps_float64():
    """The kernels are judged against attention_ref on float64 inputs: it must compute in float64, not round
    to float32 (which would make the "float64 reference" a float32 one)."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    table = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    bias = position_bias_ref(9, 9, 0, q.device, table)
    want = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1) @ v
    got = attention_ref(q, k, v, rel_table=table)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_set_variant(monkeypatch):
    monkeypatch.setattr(at, "_VARIANT", at.get_variant())
    at.set_variant("split")
    assert at.get_variant() == "split"
    with pytest.raises(ValueError, match="unknown attention kernel variant"):
        at.set_variant("fast")


def _table_grad(case, device, dtype):
    gen = torch.Generator().manual_seed(1)
    leaves, kw = _make(case, dtype, device, gen)
    out, args = _call(at.flash_attention, leaves, kw)
    grad_out = torch.randn(out.shape, generator=gen).to(device=device, dtype=dtype)
    return torch.autograd.grad(out, args["rel_table"], grad_out)[0]


def test_table_grad_deterministic(variant):
    case = dict(shape=(1, 2, 37, 70, 32), bias="t5", kw=dict(rel_max_distance=16))
    g1, g2 = (_table_grad(case, DEV, torch.float32) for _ in range(2))
    assert torch.equal(g1, g2)
    assert g1.abs().sum() > 0


def test_errors():
    q = torch.randn(1, 2, 4, 32)
    with pytest.raises(NotImplementedError, match="dropout"):
        at.flash_attention(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="at most one"):
        at.flash_attention(q, q, q, rel_table=torch.randn(32, 2), alibi_slopes=torch.ones(2))
    with pytest.raises(ValueError, match="key_padding_mask"):
        at.flash_attention(q, q, q, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        at.flash_attention(q, q, q, bias=torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match="rel_table"):
        at.flash_attention(q, q, q, rel_table=torch.randn(32, 3))


@pytest.mark.parametrize("path", ["eager", "compiled"])
@pytest.mark.parametrize("packed", ["qkv", "kv"])
def test_packed_inputs_match_separate(packed, path):
    """q, k, v packed as one projection's output ((B, M, 3, H, D), or (B, N, 2, H, D) keys and values) give
    bitwise the outputs and gradients of the same views passed separately, and the packed tensor's gradient
    comes back in its own contiguous layout (the kernels write it through strides; nothing gathers it)."""
    gen = torch.Generator().manual_seed(11)
    b, m, n, h, d = 2, 37, (37 if packed == "qkv" else 50), 2, 32
    dtype = torch.float32 if DEV == "cpu" else torch.bfloat16
    mk = lambda *shape: torch.randn(*shape, generator=gen).to(DEV, dtype)
    table = torch.randn(8, h, generator=gen).to(DEV)
    kpm = (torch.rand(b, n, generator=gen) > 0.2).to(DEV)
    if packed == "qkv":
        pk, q = mk(b, m, 3, h, d), None
        kw = dict(rel_table=table, rel_max_distance=8, causal=True, rel_bidirectional=False)
    else:
        pk, q = mk(b, n, 2, h, d), mk(b, h, m, d)
        kw = dict(key_padding_mask=kpm)
    grad = mk(b, h, m, d)
    fn = at.flash_attention
    if path == "compiled":
        from torch._dynamo.backends.debugging import aot_eager

        fn = torch.compile(at.flash_attention, backend=aot_eager, fullgraph=True)

    def run(call, packed_args):
        leaves = [t.clone().requires_grad_(True) for t in packed_args if t is not None]
        args = list(leaves) + [None] * (3 - len(leaves))  # packed: k = v = None, or v = None
        out = call(*args, **kw)
        return out, torch.autograd.grad(out, leaves, grad)

    out_p, grads_p = run(fn, (pk,) if packed == "qkv" else (q, pk))
    views = [pk[:, :, i].transpose(1, 2) for i in range(pk.shape[2])]
    sep = views if packed == "qkv" else [q, *views]
    out_s, grads_s = run(at.flash_attention, sep)
    torch.testing.assert_close(out_p, out_s, rtol=0, atol=0)
    g_pk = grads_p[-1]
    assert g_pk.shape == pk.shape and g_pk.is_contiguous()
    for i, g in enumerate(grads_s[-pk.shape[2] :]):
        torch.testing.assert_close(g_pk[:, :, i].transpose(1, 2), g, rtol=0, atol=0)
    if packed == "kv":
        torch.testing.assert_close(grads_p[0], grads_s[0], rtol=0, atol=0)
    # and against the reference, which takes the packed form too
    ref = attention_ref(
        *[
            (t.double() if t is not None else None)
            for t in ([pk, None, None] if q is None else [q, pk, None])
        ],
        **kw,
    )
    torch.testing.assert_close(out_p.double(), ref, rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_packed_input_errors():
    q = torch.randn(1, 4, 3, 2, 32)
    with pytest.raises(ValueError, match="packed qkv must be"):
        at.flash_attention(q[:, :, :2], None, None)
    with pytest.raises(ValueError, match="packed kv must be"):
        at.flash_attention(q[:, :, 0].transpose(1, 2), q, None)
    with pytest.raises(ValueError, match="k is None but v is given"):
        attention_ref(q, None, q)


# ------------------------------------------------------------- the scale and a constant bias in the exponent
def _spy_flag(monkeypatch, launcher, flag):
    """The values of keyword ``flag`` of every launch through ``launcher``, recorded from now on."""
    seen, launch = [], launcher.run

    def run(grid, *args, **kwargs):
        seen.append(kwargs[flag])
        return launch(grid, *args, **kwargs)

    monkeypatch.setattr(launcher, "run", run)
    return seen


FOLD_CASES = [
    "t5_near_far",
    "t5_near_far_causal_kpm",
    "t5_near_far_segments",
    "t5_near_far_q_offset",
    "plain",
    "kpm_full_row_masked",
    "segments",
]


@pytest.mark.parametrize("name", FOLD_CASES)
def test_folded_exponent_matches_unfolded(name, monkeypatch):
    """FOLD_SCALE: tiles whose bias is one constant take p = exp2(raw * scale - (m - c)) (forward) and
    exp2(s - (lse - c)) (backward) instead of scaling and biasing every score first. The same softmax up to
    float32 rounding, on cases with far tiles on both sides of the T5 band, masks, documents and offsets; and
    the launches really took each path."""
    if DEV == "cuda":
        pytest.skip("interpreter case; the GPU tests run the default, folded")
    case = CASES[name]
    runs = {}
    for fold in (True, False):
        monkeypatch.setattr(at, "FOLD_SCALE", fold)
        fwd = _spy_flag(monkeypatch, at._FWD, "POS_SCALE")
        dkv = _spy_flag(monkeypatch, at._DKV, "FOLD")
        dq = _spy_flag(monkeypatch, at._DQ, "FOLD")
        gen = torch.Generator().manual_seed(5)
        leaves, kw = _make(case, torch.float32, DEV, gen)
        out, args = _call(at.flash_attention, leaves, kw)
        grads = torch.autograd.grad(out, list(args.values()), torch.randn(out.shape, generator=gen))
        for flags in (fwd, dkv, dq):
            assert flags and all(f is fold for f in flags)
        runs[fold] = (out.detach(), grads)
        monkeypatch.undo()
    (o1, g1), (o0, g0) = runs[True], runs[False]
    torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(b.abs().max().item(), 1.0))


@pytest.mark.parametrize("tail", [True, False], ids=["table", "gather"])
@pytest.mark.parametrize("name", T5_CASES)
def test_tail_table_matches_reference(name, tail, monkeypatch):
    """TAIL_TABLE (the default) and without it: the forward's and dq's masked last steps (causal diagonal,
    key-length tail, a document's first tile, queries at offsets that put them far from the diagonal) read the
    clamped Toeplitz table, or gather the bias by distance, against float64; the launches really asked for it."""
    if DEV == "cuda":
        pytest.skip("interpreter case; on the GPU the bf16 reference cases run the default, TAIL_TABLE on")
    monkeypatch.setattr(at, "_VARIANT", "table")
    monkeypatch.setattr(at, "TAIL_TABLE", tail)
    flags = _spy_flag(monkeypatch, at._FWD, "TAIL")
    dq_flags = _spy_flag(monkeypatch, at._DQ, "TAIL")
    _check(CASES[name], torch.float32, DEV)
    assert flags and all(f is tail for f in flags)
    assert dq_flags and all(f is tail for f in dq_flags)


@pytest.mark.parametrize("scale", [-0.6, 0.0, 0.35], ids=["negative", "zero", "positive"])
@pytest.mark.parametrize("name", ["t5_near_far_causal_kpm", "kpm_full_row_masked", "t5_near_far_segments"])
def test_any_scale_sign(name, scale, monkeypatch):
    """The forward folds the scale into the exponent only when it is positive (a negative one reverses the
    order of the raw scores, and zero turns a masked -inf into NaN): every sign against float64."""
    case = dict(CASES[name])
    case["kw"] = {**case.get("kw", {}), "scale": scale}
    flags = _spy_flag(monkeypatch, at._FWD, "POS_SCALE")
    _check(case, torch.float32, DEV)
    assert flags and all(f is (scale > 0) for f in flags)


# ------------------------------------------------------------------------------------------------ GPU
GPU_CASES = {
    "plain_d128": dict(shape=(2, 4, 300, 515, 128)),
    "views_causal": dict(shape=(2, 4, 513, 513, 64), views=True, kw=dict(causal=True)),
    "decode": dict(shape=(4, 4, 1, 1000, 64), bias="t5", kw=dict(causal=True, rel_bidirectional=False)),
    "t5_bidir": dict(shape=(2, 4, 700, 1000, 64), bias="t5"),
    "t5_causal": dict(shape=(2, 4, 1000, 1000, 64), bias="t5", kw=dict(causal=True, rel_bidirectional=False)),
    "t5_d32": dict(shape=(2, 4, 257, 300, 32), bias="t5"),
    "alibi": dict(shape=(2, 4, 333, 333, 64), bias="alibi", kw=dict(causal=True)),
    "bias_B1MN": dict(shape=(2, 4, 200, 333, 64), bias="B1MN", kpm=True),
    "segments_t5": dict(shape=(2, 4, 1024, 1024, 64), seg=5, bias="t5"),
    "q_offset_tensor": dict(
        shape=(2, 4, 64, 900, 64),
        q_offset=("t", 700),
        bias="t5",
        kw=dict(causal=True, rel_bidirectional=False),
    ),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_matches_reference_gpu_bf16(name, variant):
    if variant != "table" and GPU_CASES[name].get("bias") != "t5":
        pytest.skip("the variants differ only with a T5 bias")
    _check(GPU_CASES[name], torch.bfloat16, "cuda")


def _pin_configs(monkeypatch, name, held, pick):
    """Launches of kernel ``name`` ("fwd", "dq" or "dkv") run the one config ``pick(kwargs)`` while the host
    sees the list ``held`` (the block bounds it derives: SEG_MAXB, the table gradient's row size). Returns the
    launches' SEG_PASS values."""
    kernel = {"fwd": at._fwd_kernel, "dq": at._dq_kernel, "dkv": at._dkv_kernel}[name]
    launcher = {"fwd": at._FWD, "dq": at._DQ, "dkv": at._DKV}[name]
    monkeypatch.setattr(kernel, "configs", held)
    seen, launch = [], launcher.run

    def run(grid, *args, **kwargs):
        seen.append(kwargs["SEG_PASS"])
        kernel.configs = [pick(kwargs)]
        try:
            return launch(grid, *args, **kwargs)
        finally:
            kernel.configs = held

    monkeypatch.setattr(launcher, "run", run)
    return seen


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", range(len(at._DKV_CONFIGS_GPU)))
@pytest.mark.parametrize(
    "case",
    [
        dict(shape=(2, 4, 300, 300, 64), bias="t5"),
        dict(shape=(3, 2, 1, 700, 64), bias="t5", kw=dict(causal=True, rel_bidirectional=False)),
    ],
    ids=["bidir", "decode"],
)
def test_every_dkv_config_gpu(case, cfg, monkeypatch):
    """Each dk/dv config the autotuner may pick, one at a time (an autotuned run exercises only the winner),
    whatever FAT5_ATTN_AUTOTUNE says: the table gradient's partial rows are sized by the smallest block of the
    list (64 keys), so the 128-key programs write their sums to their first row and zeros to the second; checked
    with poisoned buffers."""
    smallest = min(at._DKV_CONFIGS_GPU, key=lambda c: c.kwargs["BLOCK_N"])
    chosen = at._DKV_CONFIGS_GPU[cfg]
    _pin_configs(monkeypatch, "dkv", [chosen, smallest], lambda kw: chosen)
    monkeypatch.setattr(at, "_VARIANT", "table")
    _check(case, torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", range(max(len(at._FWD_CONFIGS_GPU), len(at._DQ_CONFIGS_GPU))))
@pytest.mark.parametrize(
    "case",
    [
        dict(shape=(2, 4, 700, 700, 64), bias="t5"),
        dict(shape=(2, 2, 600, 600, 64), bias="t5", kw=dict(causal=True, rel_bidirectional=False)),
        dict(shape=(2, 2, 333, 520, 64), kpm=True),
    ],
    ids=["t5", "t5_causal", "nobias_kpm"],
)
def test_every_fwd_and_dq_config_gpu(case, cfg, monkeypatch):
    """Each forward and dq config the autotuner may pick (the i-th of each list; the shorter list repeats its
    last), whatever FAT5_ATTN_AUTOTUNE says: their far steps fold the scale and the constant bias into the
    exponent (FOLD_SCALE), with a code path per config; lengths with far tiles on both sides of the T5 band."""
    fwd = at._FWD_CONFIGS_GPU[min(cfg, len(at._FWD_CONFIGS_GPU) - 1)]
    dq = at._DQ_CONFIGS_GPU[min(cfg, len(at._DQ_CONFIGS_GPU) - 1)]
    _pin_configs(monkeypatch, "fwd", at._FWD_CONFIGS_GPU, lambda kw: fwd)
    _pin_configs(monkeypatch, "dq", at._DQ_CONFIGS_GPU, lambda kw: dq)
    monkeypatch.setattr(at, "_VARIANT", "table")
    _check(case, torch.bfloat16, "cuda")


def test_tuning_keys_hold_the_compiled_settings():
    """Settings that change a kernel's code (and so its registers and best config) are in its autotuning key: a
    variant tuned under another's key reuses configs picked for other code (the tail table's capped config was
    never tried that way)."""
    shared = {"BLOCK_D", "BIAS_KIND", "CAUSAL", "HAS_SEG", "SEG_PASS", "NPART", "M_BUCKET", "N_BUCKET"}
    assert shared | {"TMA", "KV_TMA", "POS_SCALE", "TAIL"} <= set(at._fwd_kernel.keys)
    assert shared | {"FOLD", "TAIL"} <= set(at._dq_kernel.keys)
    assert shared | {"REL_GRAD", "CIRC", "NEAR_DKV", "FOLD"} <= set(at._dkv_kernel.keys)


@pytest.mark.parametrize("name", ["t5_near_far", "t5_near_far_causal_kpm", "t5_near_far_q_offset"])
def test_config_near_width(name, monkeypatch):
    """A forward config may carry its own near-step width (NEAR_CFG, as the GPU's 64-key 128x64 config does):
    the NEAR_N heuristic takes it over NEAR["fwd"] (the "split" variant keeps 16), and a forward whose config
    steps its whole block width on near tiles, where NEAR["fwd"] would step half of it, matches float64."""
    near_n = at._fwd_kernel.fn.values["NEAR_N"]
    assert near_n({"BLOCK_N": 64, "NEAR_CFG": 64, "NEAR_TABLE": True}) == 64
    assert near_n({"BLOCK_N": 64, "NEAR_TABLE": True}) == min(64, at.NEAR["fwd"])
    assert near_n({"BLOCK_N": 64, "NEAR_CFG": 64, "NEAR_TABLE": False}) == 16
    assert any(c.kwargs.get("NEAR_CFG") == 64 for c in at._FWD_CONFIGS_GPU)
    if DEV == "cuda":
        pytest.skip("interpreter case; the GPU runs its own configs (test_every_fwd_and_dq_config_gpu)")
    monkeypatch.setattr(at, "_VARIANT", "table")
    monkeypatch.setattr(at, "NEAR", {**at.NEAR, "fwd": 16})
    wide = at._cfg(16, 32, 1, 1, near=32)
    _pin_configs(monkeypatch, "fwd", [wide], lambda kw: wide)
    _check(CASES[name], torch.float32, DEV)


def test_table_grad_rows_follow_held_configs(monkeypatch):
    """The table gradient's partial rows are sized by the dk/dv configs the autotuner holds, not by the module's
    list: a config narrower (16 keys) than every listed one (interpreter: 32) still gets one row per program, so
    the table gradient matches float64 (sized by the module's list, every program wrote the same row)."""
    if DEV == "cuda":
        pytest.skip("interpreter case")
    narrow = at._cfg(16, 16, 1, 1)
    assert all(narrow.kwargs["BLOCK_N"] < c.kwargs["BLOCK_N"] for c in at._DKV_CONFIGS)
    _pin_configs(monkeypatch, "dkv", [narrow], lambda kw: narrow)
    case = dict(shape=(2, 2, 40, 70, 16), bias="t5", buckets=8, kw=dict(rel_max_distance=8))
    _check(case, torch.float32, DEV)


# packed rows of GPU size: aligned documents, ragged ones (starting inside tiles), cross attention with M != N
DOC_LAYOUTS_GPU = {
    "aligned": ([_runs(*[(i, 256) for i in range(8)]), _runs(*[(i, 128) for i in range(16)])],) * 2,
    "ragged": (
        [_runs((0, 100), (1, 300), (2, 37), (3, 611), (4, 1000)), _runs((0, 700), (1, 900), (-1, 448))],
    )
    * 2,
    "cross": (
        [_runs((0, 300), (1, 724)), _runs((0, 1024))],
        [_runs((0, 1000), (1, 1048)), _runs((0, 130), (1, 1918))],
    ),
}


def _check_mixed_doc_pass(monkeypatch, configs, small_first, case, dtype, device):
    """``_check`` with the document pass (SEG_PASS 1) and the masked pass (2) on different blocks, as two
    autotunings may pick them: each kernel runs the smallest block of its ``configs`` list in one pass and the
    largest in the other (the host sees both: SEG_MAXB is the largest)."""
    monkeypatch.setattr(at, "_VARIANT", "table")
    monkeypatch.setattr(at, "DOC_PASS", True)
    passes = {}
    for name, dim in (("fwd", "BLOCK_M"), ("dq", "BLOCK_M"), ("dkv", "BLOCK_N")):
        small = min(configs[name], key=lambda c: c.kwargs[dim])
        large = max(configs[name], key=lambda c: c.kwargs[dim])
        assert small.kwargs[dim] < large.kwargs[dim]
        first, second = (small, large) if small_first else (large, small)
        passes[name] = _pin_configs(
            monkeypatch, name, [small, large], lambda kw, a=first, b=second: a if kw["SEG_PASS"] == 1 else b
        )
    _check(case, dtype, device)
    assert all(seen == [1, 2] for seen in passes.values()), passes


@pytest.mark.parametrize("small_first", [True, False], ids=["small_then_large", "large_then_small"])
@pytest.mark.parametrize("layout", list(DOC_LAYOUTS))
def test_document_pass_mixed_blocks(layout, small_first, monkeypatch):
    """The document pass and the masked pass on different blocks (64 and 128 rows; dk/dv 64 and 128 keys) in the
    interpreter, against float64: pass 2 must leave to pass 1 exactly the blocks whose 128-wide span is one
    document, whichever pass has the small block (causal when the large block comes first)."""
    if DEV == "cuda":
        pytest.skip("interpreter case")
    configs = {
        "fwd": [at._cfg(64, 64, 1, 1), at._cfg(128, 64, 1, 1)],
        "dq": [at._cfg(64, 64, 1, 1), at._cfg(128, 64, 1, 1)],
        "dkv": [at._cfg(32, 64, 1, 1), at._cfg(64, 128, 1, 1)],
    }
    q_ids, kv_ids = DOC_LAYOUTS[layout]
    causal = not small_first
    case = dict(
        shape=(2, 1, len(q_ids[0]), len(kv_ids[0]), 16),
        bias="t5",
        buckets=8,
        seg_ids=(q_ids, kv_ids),
        kw=dict(rel_max_distance=8, causal=causal, rel_bidirectional=not causal),
    )
    _check_mixed_doc_pass(monkeypatch, configs, small_first, case, torch.float32, DEV)


@pytest.mark.gpu
@pytest.mark.parametrize("small_first", [True, False], ids=["small_then_large", "large_then_small"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", list(DOC_LAYOUTS_GPU))
def test_document_pass_mixed_configs_gpu(layout, causal, small_first, monkeypatch):
    """As test_document_pass_mixed_blocks with the GPU's configs at GPU sizes, in bf16 (poisoned outputs)."""
    configs = {"fwd": at._FWD_CONFIGS_GPU, "dq": at._DQ_CONFIGS_GPU, "dkv": at._DKV_CONFIGS_GPU}
    q_ids, kv_ids = DOC_LAYOUTS_GPU[layout]
    case = dict(
        shape=(2, 4, len(q_ids[0]), len(kv_ids[0]), 64),
        bias="t5",
        seg_ids=(q_ids, kv_ids),
        kw=dict(causal=causal, rel_bidirectional=not causal),
    )
    _check_mixed_doc_pass(monkeypatch, configs, small_first, case, torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_table_grad_deterministic_gpu(variant):
    case = dict(shape=(4, 8, 1024, 1024, 64), bias="t5")
    g1, g2 = (_table_grad(case, "cuda", torch.bfloat16) for _ in range(2))
    assert torch.equal(g1, g2)


@pytest.mark.gpu
@pytest.mark.parametrize("dkv", [c for c in at._DKV_CONFIGS_GPU], ids=lambda c: f"{c.kwargs}w{c.num_warps}")
@pytest.mark.parametrize("causal", [False, True])
def test_rotated_skew_sums_as_deferred_gpu(dkv, causal, monkeypatch):
    """CIRC_SKEW 3 against 2 on every dk/dv config of the GPU, bf16, queries at an offset: the same sums, so
    the same table gradient (to float32 rounding, should the compiler order a reduction differently)."""
    monkeypatch.setattr(at._dkv_kernel, "configs", [dkv])
    case = dict(
        shape=(2, 4, 700, 1100, 64),
        bias="t5",
        q_offset=250,
        kw=dict(causal=causal, rel_bidirectional=not causal),
    )
    g2, g3 = (_table_grad_with(c, case, "cuda", torch.bfloat16, monkeypatch) for c in (2, 3))
    assert g2.abs().sum() > 0
    torch.testing.assert_close(g3, g2, rtol=1e-5, atol=1e-5 * g2.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("name", [n for n, c in GPU_CASES.items() if c.get("bias") == "t5"])
def test_tma_forward_gpu(name, monkeypatch):
    """The forward with its near bias through TMA, in the near steps it would use (64 keys), on the GPU."""
    monkeypatch.setattr(at, "_VARIANT", "table")
    monkeypatch.setattr(at, "TMA", True)
    monkeypatch.setattr(at, "NEAR", {**at.NEAR, "fwd": 64})
    _check(GPU_CASES[name], torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_kv_tma_forward_gpu(name, monkeypatch):
    """The forward with its keys and values read through tensor descriptors (at.KV_TMA), on the GPU (the
    config the autotuner picks); the launch must really have taken that path."""
    monkeypatch.setattr(at, "_VARIANT", "table")
    monkeypatch.setattr(at, "KV_TMA", True)
    flags = _spy_fwd_flag(monkeypatch, "KV_TMA")
    _check(GPU_CASES[name], torch.bfloat16, "cuda")
    assert flags and all(flags)


@pytest.mark.gpu
@pytest.mark.parametrize("near", [32, 64])
@pytest.mark.parametrize("name", [n for n, c in GPU_CASES.items() if c.get("bias") == "t5"])
def test_half_table_gpu(name, near, monkeypatch):
    """The T5 bias buffer in fp16 (at.HALF_TABLE) on the GPU in bf16, forward near steps of 32 and 64 keys:
    values and every gradient within the error rule, and the buffer really was fp16."""
    monkeypatch.setattr(at, "_VARIANT", "table")
    monkeypatch.setattr(at, "HALF_TABLE", True)
    monkeypatch.setattr(at, "NEAR", {**at.NEAR, "fwd": near})
    dtypes = _spy_rbv_dtype(monkeypatch)
    _check(GPU_CASES[name], torch.bfloat16, "cuda")
    assert dtypes and set(dtypes) == {torch.float16}


def test_eager_and_compiled_paths_agree():
    """Eager calls go through an autograd.Function, torch.compile traces the torch.library custom ops (fake
    kernels, registered backward): both give the same outputs and gradients, without a graph break."""
    if DEV == "cuda":
        pytest.skip("interpreter-sized case; the gpu test covers torch.compile on CUDA")
    gen = torch.Generator().manual_seed(5)
    case = dict(shape=(1, 2, 40, 40, 16), bias="t5", buckets=8, seg=2, kw=dict(rel_max_distance=8))
    leaves, kw = _make(case, torch.float32, DEV, gen)
    grad = torch.randn(1, 2, 40, 16, generator=gen)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    from torch._dynamo.backends.debugging import aot_eager

    results = []
    for fn in (at.flash_attention, torch.compile(at.flash_attention, backend=backend, fullgraph=True)):
        out, args = _call(
            fn, {n: t.detach().clone().requires_grad_(t.requires_grad) for n, t in leaves.items()}, kw
        )
        diff = [t for t in args.values() if t.requires_grad]
        results.append((out, *torch.autograd.grad(out, diff, grad)))
    assert len(results[0]) >= 5  # out and the gradients of q, k, v and the bias table
    targets = [node.target for gm in graphs for node in gm.graph.nodes]
    assert torch.ops.fat5.flash_attention_fwd.default in targets
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.gpu
def test_torch_compile_and_cuda_graph():
    gen = torch.Generator().manual_seed(2)
    case = dict(shape=(2, 4, 128, 256, 64), bias="t5", kw=dict(causal=True))
    leaves, kw = _make(case, torch.bfloat16, "cuda", gen)
    eager, _ = _call(at.flash_attention, leaves, kw)
    compiled = torch.compile(at.flash_attention, fullgraph=True)
    out, args = _call(compiled, leaves, kw)
    torch.testing.assert_close(out, eager, atol=0, rtol=0)
    out.float().sum().backward()
    assert torch.isfinite(args["rel_table"].grad).all()
    # decode step captured in a CUDA graph: q_offset read from device memory, changed between replays
    q = torch.randn(2, 4, 1, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
    table = leaves["rel_table"].detach()
    off = torch.tensor(100, device="cuda")
    kw = dict(causal=True, q_offset=off, rel_table=table, rel_bidirectional=False)
    at.flash_attention(q, k, k, **kw)  # compile + autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = at.flash_attention(q, k, k, **kw)
    for pos in (10, 200):
        off.fill_(pos)
        graph.replay()
        ref = attention_ref(
            q.double(),
            k.double(),
            k.double(),
            causal=True,
            q_offset=pos,
            rel_table=table.double(),
            rel_bidirectional=False,
        )
        assert (static_out.double() - ref).abs().max() < 2e-2


def test_device_constants_during_capture(monkeypatch):
    """The cached constant tensors (bucket ids, index map, placeholder): built once; while a CUDA graph is
    being captured an existing entry is read as it is (the graph replays no kernels rebuilding it), and a
    missing one is built without being cached (a tensor made during capture must not outlive the graph)."""
    dev = torch.device("cpu")
    at._distance_buckets.cache_clear()
    first = at._distance_buckets(32, True, 128, dev)
    assert at._distance_buckets(32, True, 128, dev) is first
    monkeypatch.setattr(at, "_capturing", lambda d: True)
    assert at._distance_buckets(32, True, 128, dev) is first
    fresh = at._distance_buckets(16, False, 64, dev)
    again = at._distance_buckets(16, False, 64, dev)
    assert fresh is not again and torch.equal(fresh[0], again[0])  # built each time, never stored
    assert (16, False, 64, dev) not in at._distance_buckets.entries
    monkeypatch.setattr(at, "_capturing", lambda d: False)
    assert at._distance_buckets(16, False, 64, dev) is at._distance_buckets(16, False, 64, dev)
    w = at._saturation_width(16, False, 64)
    ref = relative_position_bucket(torch.arange(-w, w + 1), False, 16, 64)
    assert torch.equal(at._distance_buckets(16, False, 64, dev)[0], ref)


@pytest.mark.parametrize(
    "nb,bidirectional,max_distance",
    [(32, True, 128), (32, False, 128), (8, True, 20), (16, False, 64), (64, True, 512), (4, True, 3)],
)
def test_saturation_width(nb, bidirectional, max_distance):
    """W: every distance at or beyond +-W falls in the bucket of +-W (checked far past max_distance), and W is
    the first such distance up to the one distance of margin (W - 2 is not saturated on some side)."""
    w = at._saturation_width(nb, bidirectional, max_distance)
    assert 1 <= w <= max(max_distance, nb)
    far = 4 * max(max_distance, nb)
    d = torch.arange(-far, far + 1)
    b = relative_position_bucket(d, bidirectional, nb, max_distance)
    at_d = lambda x: b[far + x].item()
    assert all(at_d(x) == at_d(w) for x in range(w, far + 1))
    assert all(at_d(-x) == at_d(-w) for x in range(w, far + 1))
    if w > 2:
        assert at_d(w - 2) != at_d(w) or at_d(2 - w) != at_d(-w)
    if (nb, bidirectional, max_distance) == (32, True, 128):
        assert w == 92  # the last log bucket of T5's default starts at |d| = 91


def test_saturation_width_under_fake_tensors():
    """torch.compile's shape propagation calls the forward's fake implementation, which needs W for the
    distance buffer's shape, inside a fake-tensor mode: W is still computed on real CPU tensors there."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    at._saturation_width.cache_clear()
    with FakeTensorMode():
        w = at._saturation_width(32, True, 128)
    assert w == 92


@pytest.mark.parametrize("nb,bidirectional,max_distance", [(32, True, 128), (32, False, 128), (8, True, 20)])
def test_bucket_spans(nb, bidirectional, max_distance):
    """Each bucket's [lo, hi) span of distance indices runs from its first to one past its last distance (and is
    empty for a bucket no distance falls in), so the table-gradient kernel's masked scan covers it exactly."""
    buckets, lo, hi = at._distance_buckets(nb, bidirectional, max_distance, torch.device("cpu"))
    for bkt in range(nb):
        where = (buckets == bkt).nonzero().flatten().tolist()
        if where:
            assert (lo[bkt].item(), hi[bkt].item()) == (where[0], where[-1] + 1)
        else:
            assert lo[bkt].item() == hi[bkt].item() == 0
    assert lo.dtype == hi.dtype == torch.int32


@pytest.mark.gpu
def test_reduce_overhead_training_steps_gpu():
    """torch.compile(mode="reduce-overhead") records forward and backward as CUDA graphs. The attention's cached
    tables are first built during the graphs' warmup, when the calling thread allocates into the graphs'
    private pool; they must not stay alive there ("tensors in the cudagraph pool not tracked as outputs").
    The graph-replayed steps follow the eager ones on the same weights and batches."""
    from fat5.config import FAT5Config
    from fat5.model import FAT5ForConditionalGeneration

    for cached in (at._distance_buckets, at._rel_index, at._dummy_cached):
        cached.cache_clear()
    torch.manual_seed(0)
    cfg = FAT5Config.from_preset("tiny")
    models = [FAT5ForConditionalGeneration(cfg).cuda().train() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    gen = torch.Generator().manual_seed(3)
    batches = [
        (torch.randint(2, cfg.vocab_size, (4, 96), generator=gen).cuda(),
         torch.randint(2, cfg.vocab_size, (4, 40), generator=gen).cuda())
        for _ in range(4)
    ]  # fmt: skip
    losses = []
    for model, graphs in zip(models, (True, False)):  # graphs first: the caches are empty
        fwd = torch.compile(model, mode="reduce-overhead") if graphs else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        run = []
        for ids, labels in batches:
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            loss = fwd(input_ids=ids, labels=labels).loss
            loss.backward()
            run.append(loss.item())
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(run)
    assert all(torch.isfinite(torch.tensor(r)).all() for r in losses)
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=2e-3, atol=2e-3)


def test_backward_fills_no_zero_gradients(monkeypatch):
    """lse and the bias buffer are outputs nobody differentiates: autograd must not zero-fill their gradients
    (an lse-sized and a ~3.5 MB fill per call at the model's size)."""
    from kernel_checks import zero_fills

    monkeypatch.setattr(at, "_POISON", False)  # the debug NaN fills of the outputs are fills too

    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=gen).to(DEV).requires_grad_() for _ in range(3))
    table = torch.randn(8, 2, generator=gen).to(DEV).requires_grad_()
    out = at.flash_attention(q, k, v, rel_table=table, rel_bidirectional=True, rel_max_distance=8)
    g = torch.randn_like(out)
    fills = zero_fills(lambda: torch.autograd.grad(out, (q, k, v, table), g))
    assert not fills, fills
