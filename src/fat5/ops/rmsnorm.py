"""RMSNorm as in T5 (no mean subtraction, no bias): y = x / sqrt(mean(x^2) + eps) * w, statistics in fp32.

``rms_norm_ref`` is the specification. With ``residual`` given, the op first forms ``x + residual`` and
returns ``(normed, new_residual)``: the pre-norm block's add and norm in one pass. ``out_dtype`` sets the
normed output's dtype: under bf16 autocast the model asks for bf16 where the output feeds a linear layer, so
an fp32 residual stream is read and written in fp32 but the normed copy is written once, in bf16 (the same
values the linear layer's autocast cast would give).

``rms_norm_triton`` is the same op as two Triton kernels (forward: add + norm in one read of each input, in
their own dtypes; backward: dx, d residual and per-program dweight partials in one pass), registered as ``fat5::rms_norm_fwd`` /
``fat5::rms_norm_bwd`` through ``torch.library`` so ``torch.compile`` keeps them in one graph (eager calls use
an autograd.Function over the same code: ``ops/registration.py``). Limits: rows of
at most 65536 elements; the tensors must be on the device Triton runs on (CPU only under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from .launch import Launcher, cdiv, next_pow2, pdl
from .registration import op_pair


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``out_dtype``: dtype of the normed output (default: that of ``x + residual``); the new residual keeps
    torch's promoted dtype. The statistics are fp32 either way, so asking for bf16 here equals casting the
    fp32 output afterwards."""
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: last dim of x ({x.shape[-1]}) != weight size ({weight.shape[0]})")
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    y = y.to(out_dtype or x.dtype)
    return (y, x) if residual is not None else y


# --------------------------------------------------------------------------------------------------------------
# Triton kernels. Forward: a tile of BLOCK_M rows x next_pow2(d) columns per program, fp32 statistics, saves
# 1/rms per row (4 bytes a row) so the backward needs no second reduction over x^2. Backward: a fixed number of
# programs (a few per SM) each walk a contiguous band of rows, write dx and keep their own fp32 partial sum of
# dy * x_hat for dweight; a second small kernel sums the partials in a fixed order: deterministic, no atomics.
#   x_hat = h * rstd,  y = x_hat * w,  dh = rstd * (dy*w - x_hat * mean(dy*w * x_hat)),  dw = sum_rows dy*x_hat
# where h = x (+ residual). With residual, d(residual) = d(x) = dh + grad of the returned new residual.
# Limits: rows up to 65536 wide (one row lives in registers); x is viewed as (rows, d) and copied if its rows
# are not contiguous.
# --------------------------------------------------------------------------------------------------------------

_MAX_WIDTH = 65536


# Row chunks. A tile is normally (BLOCK_M, BLOCK_N); where a row is wider than one warp's loads, Triton spreads
# its columns over several warps, so each row sum meets in shared memory behind barriers, every tile. With
# CHUNK < BLOCK_N a tile is held as (BLOCK_M, BLOCK_N // CHUNK, CHUNK) instead (row r, column s * CHUNK + c at
# [r, s, c]): Triton lays out the unit-stride dim first, then the others in index order, rows before chunks, so
# the warps go to rows, a thread holds the same lanes of every chunk, and a row's sum stays in one warp
# (in-thread adds, then shuffles). The helpers below give either form; the arithmetic is rank-agnostic.


@triton.jit
def _cols(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """Column index of a tile (broadcast over its rows)."""
    if CHUNK < BLOCK_N:
        cols = tl.arange(0, BLOCK_N // CHUNK)[None, :, None] * CHUNK + tl.arange(0, CHUNK)[None, None, :]
    else:
        cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,): broadcast against (BLOCK_M, BLOCK_N) tiles
    return cols


@triton.jit
def _rowwise(v, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """A per-row vector broadcast against a tile."""
    if CHUNK < BLOCK_N:
        out = v[:, None, None]
    else:
        out = v[:, None]
    return out


@triton.jit
def _row_sum(x, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    if CHUNK < BLOCK_N:
        out = tl.sum(tl.sum(x, axis=2), axis=1)
    else:
        out = tl.sum(x, axis=1)
    return out


@triton.jit
def _load_w(W, cols, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    if CHUNK < BLOCK_N:
        # a tile-shaped load (w once per row), so that it takes the tiles' layout: loaded as one row, its layout
        # would spread the warps over the chunks, and the whole loop would follow it
        w = tl.load(W + cols + 0 * tl.arange(0, BLOCK_M)[:, None, None], mask=cols < N, other=0.0)
    else:
        w = tl.load(W + cols, mask=cols < N, other=0.0)
    return w.to(tl.float32)


@triton.jit
def _prefetch_l2(P, start, total, COUNT: tl.constexpr):
    """Ask L2 for elements [start, start + COUNT) of P (clamped to the first ``total``), one request per 128-byte
    line. Issued before ``gdc_wait``: the lines come from memory while the previous kernel finishes, and the
    loads after the wait find them in L2. Safe on data that kernel writes: L2 is the GPU's point of coherence,
    its writes update the lines there (nothing is prefetched into L1)."""
    STEP: tl.constexpr = 1024 // P.dtype.element_ty.primitive_bitwidth  # elements per 128-byte line
    LINES: tl.constexpr = (COUNT + STEP - 1) // STEP  # both powers of two
    offs = tl.minimum(start + tl.arange(0, LINES).to(tl.int64) * STEP, total - 1)
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;",
        "=r,l",
        [P + offs],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, Y, H, W, RSTD, M, N, eps,
    HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    PDL: tl.constexpr = False, EVICT: tl.constexpr = "", STORE_CACHE: tl.constexpr = "",
):  # fmt: skip
    if PDL:  # launched as a programmatic dependent: wait for the previous kernel, let the next one get placed
        gdc_wait()
        gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = _cols(BLOCK_M, BLOCK_N, CHUNK)
    row_ok = rows < M
    mask = _rowwise(row_ok, BLOCK_N, CHUNK) & (cols < N)
    offs = _rowwise(rows.to(tl.int64), BLOCK_N, CHUNK) * N + cols
    x = tl.load(X + offs, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
    if HAS_RES:
        # round the sum to the storage dtype first: the returned residual and the normed value see the same h
        h = (x + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + offs, h, mask=mask)
        x = h.to(tl.float32)
    rstd = tl.rsqrt(_row_sum(x * x, BLOCK_N, CHUNK) / N + eps)
    y = x * _rowwise(rstd, BLOCK_N, CHUNK) * _load_w(W, cols, N, BLOCK_M, BLOCK_N, CHUNK)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask, cache_modifier=STORE_CACHE)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, DRES, H, W, RSTD, DX, DXL, DW_PARTIAL, DW, GROUP_PARTIAL, COUNT, M, N,
    ROWS_PER_PROGRAM: tl.constexpr, HAS_DRES: tl.constexpr, HAS_DXL: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, STAGES: tl.constexpr = 3, PDL: tl.constexpr = False,
    TMA: tl.constexpr = False, FUSED: tl.constexpr = False, GROUP: tl.constexpr = 16,
    MAX_GROUPS: tl.constexpr = 1, STRIDED: tl.constexpr = False, PREFETCH: tl.constexpr = 0,
    EVICT: tl.constexpr = "", STORE_CACHE: tl.constexpr = "",
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if PDL:
        if not TMA:  # the first PREFETCH tiles of h and dy on their way to L2 while the previous kernel ends
            for t in tl.static_range(PREFETCH):
                if STRIDED:
                    start = ((t * nprog + pid) * BLOCK_M).to(tl.int64) * N
                else:
                    start = (pid * ROWS_PER_PROGRAM + t * BLOCK_M).to(tl.int64) * N
                _prefetch_l2(H, start, M.to(tl.int64) * N, BLOCK_M * BLOCK_N)
                _prefetch_l2(DY, start, M.to(tl.int64) * N, BLOCK_M * BLOCK_N)
        gdc_wait()
        gdc_launch_dependents()
    cols = _cols(BLOCK_M, BLOCK_N, CHUNK)
    col_ok = cols < N
    w = _load_w(W, cols, N, BLOCK_M, BLOCK_N, CHUNK)
    if CHUNK < BLOCK_N:
        dw = tl.zeros([BLOCK_M, BLOCK_N // CHUNK, CHUNK], dtype=tl.float32)
    else:
        dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # the compiler's software pipeline: STAGES tiles of loads in flight through shared memory (async copies)
    for i in tl.range(0, ROWS_PER_PROGRAM, BLOCK_M, num_stages=STAGES):
        # a program's tiles: a band of ROWS_PER_PROGRAM rows, or (STRIDED) every nprog-th tile, so that at any
        # moment the programs together read one compact stretch of each tensor, as a plain elementwise grid does
        if STRIDED:
            first = ((i // BLOCK_M) * nprog + pid) * BLOCK_M
        else:
            first = pid * ROWS_PER_PROGRAM + i
        rows = first + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = _rowwise(row_ok, BLOCK_N, CHUNK) & col_ok
        offs = _rowwise(rows.to(tl.int64), BLOCK_N, CHUNK) * N + cols
        # with TMA (whole-row tiles only), H and DY are tensor descriptors: one bulk copy per tile, rows and
        # columns outside read 0
        if TMA:
            h = H.load([first, 0]).to(tl.float32)
            dy = DY.load([first, 0]).to(tl.float32)
        else:
            h = tl.load(H + offs, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
        rstd = _rowwise(tl.load(RSTD + rows, mask=row_ok, other=0.0), BLOCK_N, CHUNK)
        xhat = h * rstd
        wdy = dy * w
        c = _row_sum(xhat * wdy, BLOCK_N, CHUNK) / N
        dx = (wdy - xhat * _rowwise(c, BLOCK_N, CHUNK)) * rstd
        if HAS_DRES:
            dx += tl.load(DRES + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask, cache_modifier=STORE_CACHE)
        if HAS_DXL:  # the same gradient in the lower dtype of a mixed-dtype add (x or residual)
            tl.store(DXL + offs, dx.to(DXL.dtype.element_ty), mask=mask)
        dw += dy * xhat
    # the program's partial dweight row (rows summed; the chunked form stores its chunks as they lie)
    if CHUNK < BLOCK_N:
        pcols = tl.reshape(cols, [BLOCK_N // CHUNK, CHUNK])
    else:
        pcols = cols
    tl.store(DW_PARTIAL + pid.to(tl.int64) * N + pcols, tl.sum(dw, axis=0), mask=pcols < N)
    if FUSED:
        _dw_tail(DW_PARTIAL, GROUP_PARTIAL, DW, COUNT, pid, nprog, N, BLOCK_N, GROUP, MAX_GROUPS)


@triton.jit
def _dw_tail(
    P, G, DW, COUNT, pid, nprog, N, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, MAX_GROUPS: tl.constexpr
):
    """dweight = the sum of the programs' partial rows P, inside the backward kernel (no second launch), in a
    fixed order whichever program does it: deterministic. The programs are cut into groups of GROUP; the last
    of a group to arrive (an integer counter per group) sums the group's rows in order into G; the last group to
    finish (one more counter) sums the rows of G in order into DW and sets the counters back to zero for the
    next launch. The counters (COUNT, MAX_GROUPS + 1 of them, zero before the launch) belong to one launch at a
    time. A program's stores reach the whole GPU before its arrival is counted: barrier, then a release
    increment; the summing program reads after an acquire increment, from L2 (.cg)."""
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    ngroups = (nprog + GROUP - 1) // GROUP
    g = pid // GROUP
    tl.debug_barrier()
    arrived = tl.atomic_add(COUNT + g, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.minimum(GROUP, nprog - g * GROUP) - 1:
        acc = tl.zeros([BLOCK_N], tl.float32)
        for j in range(GROUP):
            p = g * GROUP + j
            acc += tl.load(
                P + p.to(tl.int64) * N + cols, mask=ok & (p < nprog), other=0.0, cache_modifier=".cg"
            )
        tl.store(G + g.to(tl.int64) * N + cols, acc, mask=ok)
        tl.debug_barrier()
        done = tl.atomic_add(COUNT + MAX_GROUPS, 1, sem="acq_rel", scope="gpu")
        if done == ngroups - 1:
            acc = tl.zeros([BLOCK_N], tl.float32)
            for j in range(MAX_GROUPS):
                acc += tl.load(G + j * N + cols, mask=ok & (j < ngroups), other=0.0, cache_modifier=".cg")
            tl.store(DW + cols, acc.to(DW.dtype.element_ty), mask=ok)
            for j in range(MAX_GROUPS + 1):
                tl.store(COUNT + j, 0)


@triton.jit
def _sum_rows_kernel(
    P, OUT, R, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False,
    RELEASE: tl.constexpr = False,
):  # fmt: skip
    """OUT[n] = sum over the R rows of P[:, n] in a fixed order, cast to OUT's dtype (one launch)."""
    if PDL:
        gdc_wait()
        if RELEASE:
            gdc_launch_dependents()
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < R)[:, None] & (cols < N)[None, :]
        acc += tl.load(P + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=m, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=cols < N)


# tile overrides for benchmarks/rmsnorm_sweep.py and bench_kernels.py; empty = the defaults below:
#   "fwd": (BLOCK_M, num_warps); "bwd": (BLOCK_M, num_warps, programs per SM); "stages": backward pipeline
#   depth (>= 1); "fwd_chunk" / "chunk": forward / backward row chunk in columns (see "Row chunks");
#   "reduce": (BLOCK_R, BLOCK_N) of the dweight sum; "fused_reduce": True, dweight summed inside the backward
#   kernel (no second launch; "group": programs per first-level sum); "tma": True, backward tiles read by tensor
#   descriptor; "no_reduce": True, dweight left unwritten (to time the backward kernel alone); "pdl": False;
#   "strided": True / False, the backward's programs take every nprog-th tile / a contiguous band of rows
#   (default: strided for rows wider than 512, 0.1-1.1% off the step at d 768 / 1024 / 4096 in three H100 runs,
#   2.8-3% slower at 512; benchmarks/results/2026-12-07-rmsnorm-step.md);
#   "prefetch": k, the backward's programs ask L2 for their first k tiles before waiting on the previous kernel
#   (with PDL; default 2: 2.6% / 1.1% / 0.5% / 0 off the fwd+bwd step at d 512 / 768 / 1024 / 4096 on an H100,
#   benchmarks/results/2026-12-06-rmsnorm-layout.md; 0 turns it off); "reduce_release" (default True): the
#   dweight sum lets the next kernel be placed (PDL) as soon as it starts (that kernel still waits for the sum to
#   finish before it reads; 0.6-1.0% off the step at d 768 / 1024 in two H100 runs, even elsewhere); "stream":
#   True, the streamed tensors' loads marked evict-first and their stores cache-streaming (both kernels);
#   "maxnreg": k, the backward compiled to at most k registers a thread (168: three 4-warp programs fit an SM,
#   where the code asks 172-198); "per_sm": backward programs per SM; "even_bands": True, bands of the fewest
#   whole tiles rather than a power of two of rows. The last four measured on an H100 (2026-12-07): none beat the
#   default tiles (benchmarks/results/2026-12-07-rmsnorm-step.md)
TUNE: dict = {}


_FWD, _BWD, _SUM_ROWS = (Launcher(k) for k in (_rms_norm_fwd_kernel, _rms_norm_bwd_kernel, _sum_rows_kernel))


def _pdl(device: torch.device) -> dict:
    """Launch options of a programmatic dependent launch where the GPU has it (``launch.pdl``): the kernel's
    start overlaps the previous kernel's last programs. Off as well with ``TUNE["pdl"] = False`` (sweeps)."""
    return {"PDL": True, "launch_pdl": True} if pdl(device) and TUNE.get("pdl", True) else {}


def _stream() -> dict:
    """Cache hints of the streamed tensors (read or written once): opt-in, ``TUNE["stream"]``."""
    return {"EVICT": "evict_first", "STORE_CACHE": ".cs"} if TUNE.get("stream") else {}


def _tile(n: int) -> tuple[int, int, int]:
    """Forward (BLOCK_M, BLOCK_N, num_warps): about 2048 elements a tile, so narrow rows are batched per
    program (a sweep on the H200, benchmarks/rmsnorm_sweep.py, put the forward at 90-100% of copy bandwidth)."""
    block_n = next_pow2(n)
    block_m = max(1, min(16, 2048 // block_n))
    num_warps = min(8, max(4, block_m * block_n // 512))
    return block_m, block_n, num_warps


def _bwd_tile(n: int, read_bytes: int = 4) -> tuple[int, int, int, int, int]:
    """Backward (BLOCK_M, BLOCK_N, num_warps, programs per SM, pipeline stages) from the bytes each element
    reads (h, dy and the residual gradient: 4 for bf16, 10 for the model's bf16 dy with an fp32 residual
    stream). The loop is software-pipelined by the compiler (``tl.range(num_stages=...)``: the next tiles'
    loads land in shared memory while this one is computed), which beat the earlier hand prefetch through
    registers by 1.1-1.3x (H200 sweep, benchmarks/rmsnorm_sweep.py, 2026-12-04: bf16 d 512 / 768 / 1024 at
    30.8 / 42.4 / 54.2 us against 38.5 / 55.7 / 62.4; the mixed case at 768 even). Fastest there: tiles
    reading 16-20 KB, 4 warps, 2 programs per SM, 3 stages; the stages shrink for very wide rows so that
    two programs' buffers still fit in shared memory."""
    block_n = next_pow2(n)
    tile_rows = max(1, 20480 // (block_n * read_bytes))
    block_m = min(8, 1 << (tile_rows.bit_length() - 1))
    # 3 stages of the 16-20 KB tiles; 4 where a tile reads less than 14 KB (d = 768: a 1024-wide tile, a quarter
    # of it masked, 12 KB), which keeps about as many bytes in flight. H200 sweep 2026-12-04
    # (rmsnorm_sweep_2026-12-04.json): 4 stages at d 768 took 42.1 us against 43.6 with 3; at d 512 and 1024, 3
    # stages were best. Fewer where two programs' padded buffers would not fit in shared memory.
    most = 4 if block_m * n * read_bytes < 14 * 1024 else 3
    stages = max(1, min(most, (96 * 1024) // (block_m * block_n * read_bytes)))
    return block_m, block_n, 4 if block_n <= 1024 else 8, 2, stages


@functools.cache
def _num_programs(device: torch.device, per_sm: int | None = None) -> int:
    if device.type == "cuda":
        # programs per SM from _bwd_tile (2 in the sweeps); the fp32 partials stay tiny
        return (per_sm or 2) * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter runs programs one by one: few and long is fastest


@functools.cache
def _counters(device: torch.device, size: int) -> torch.Tensor:
    """Zeroed int32 arrival counters of the backward's in-kernel dweight sums (each launch leaves them zero)."""
    return torch.zeros(size, dtype=torch.int32, device=device)


def _rms_norm_fwd_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: (M, N) contiguous, dtypes may differ (the kernel adds in fp32 and rounds to the promoted
    dtype). Returns (y, h, rstd); y in ``out_dtype`` (default h's), h = x + residual, or empty without it."""
    m, n = x.shape
    h_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    y = torch.empty((m, n), dtype=out_dtype or h_dtype, device=x.device)
    h = torch.empty((m, n), dtype=h_dtype, device=x.device) if residual is not None else x.new_empty(0)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block_m, block_n, warps = _tile(n)
        if "fwd" in TUNE:
            block_m, warps = TUNE["fwd"]
        chunk = min(block_n, TUNE["fwd_chunk"]) if TUNE.get("fwd_chunk") else block_n
        _FWD[(cdiv(m, block_m),)](
            x, residual if residual is not None else x, y, h if residual is not None else y, weight, rstd,
            m, n, eps, HAS_RES=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, CHUNK=chunk, num_warps=warps,
            **_pdl(x.device), **_stream(),
        )  # fmt: skip
    return y, h, rstd


def _rms_norm_fwd_fake(x, weight, residual, eps, out_dtype):
    h_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    h = x.new_empty(x.shape, dtype=h_dtype) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape, dtype=out_dtype or h_dtype), h, x.new_empty(x.shape[0], dtype=torch.float32)


def _reduce_tile(rows: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_N) of the dweight reduction: all partial rows of a column strip in one load where they
    fit, narrow strips so that d / BLOCK_N programs share the work (it is latency-bound: ~1 MB in all)."""
    block_r = min(256, next_pow2(max(rows, 1)))
    return block_r, max(8, 4096 // block_r)


def _tma_ok(t: torch.Tensor, n: int) -> bool:
    """A (rows, n) contiguous tensor a 2D tensor descriptor can address: 16-byte aligned base and rows."""
    return t.data_ptr() % 16 == 0 and (n * t.element_size()) % 16 == 0


def _rms_norm_bwd_impl(
    dy: torch.Tensor,
    dres: torch.Tensor | None,
    h: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    low_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy, dres (grad of the returned residual, or None), h: (M, N) contiguous. Returns (dh, dlow, dweight):
    dh in h's dtype, dlow the same values in ``low_dtype`` (empty when None), for an input of lower dtype."""
    m, n = h.shape
    dx = torch.empty_like(h)
    dlow = torch.empty((m, n), dtype=low_dtype, device=h.device) if low_dtype is not None else h.new_empty(0)
    read_bytes = dy.element_size() + h.element_size() + (dres.element_size() if dres is not None else 0)
    block_m, block_n, warps, per_sm, stages = _bwd_tile(n, read_bytes)
    stages = max(1, TUNE.get("stages", stages))
    # row chunks (see the kernels): opt-in until measured on the GPU; 256 columns are one warp's 16-byte loads
    # of a bf16 row (128 of an fp32 row)
    chunk = min(block_n, TUNE["chunk"]) if TUNE.get("chunk") else block_n
    if "bwd" in TUNE:
        block_m, warps, per_sm = TUNE["bwd"]
    per_sm = TUNE.get("per_sm", per_sm)
    # Each program's band is a power of two >= BLOCK_M rows: whole tiles, and a compile-time loop count (few
    # recompiles across batch sizes; the interpreter with numpy >= 2.4 also fails on runtime loop bounds).
    # TUNE["even_bands"]: the fewest whole tiles that spread the rows over all programs instead (a grid of
    # programs per SM that are not a power of two, e.g. 3 with TUNE["maxnreg"] = 168, stays one wave)
    target = _num_programs(h.device, per_sm)
    if TUNE.get("even_bands"):
        rows_per_program = block_m * cdiv(cdiv(max(m, 1), target), block_m)
    else:
        rows_per_program = max(block_m, next_pow2(cdiv(max(m, 1), target)))
    programs = cdiv(m, rows_per_program)
    partial = torch.empty(programs, n, dtype=torch.float32, device=h.device)
    dw = torch.empty_like(weight)
    # dweight summed inside the backward kernel by its last programs (opt-in until measured: TUNE["fused_reduce"])
    fused = bool(TUNE.get("fused_reduce")) and m > 0 and not TUNE.get("no_reduce")
    group, max_groups, group_partial, count = 16, 1, partial, partial  # unused unless fused
    if fused:
        group = TUNE.get("group", 16)  # programs per first-level sum
        max_groups = cdiv(_num_programs(h.device, per_sm), group)
        group_partial = torch.empty(max_groups, n, dtype=torch.float32, device=h.device)
        count = _counters(h.device, max_groups + 1)
    h_arg, dy_arg, tma = h, dy, False
    if TUNE.get("tma") and chunk == block_n and _tma_ok(h, n) and _tma_ok(dy, n):
        h_arg = TensorDescriptor.from_tensor(h, [block_m, block_n])
        dy_arg = TensorDescriptor.from_tensor(dy, [block_m, block_n])
        tma = True
    if m:
        # descriptor arguments go through Triton's own launch path (the memoised one keys on tensors and ints)
        (_rms_norm_bwd_kernel if tma else _BWD)[(programs,)](
            dy_arg, dres if dres is not None else dy, h_arg, weight, rstd, dx,
            dlow if low_dtype is not None else dx, partial, dw, group_partial, count, m, n,
            ROWS_PER_PROGRAM=rows_per_program, HAS_DRES=dres is not None, HAS_DXL=low_dtype is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, CHUNK=chunk, STAGES=stages, num_warps=warps, TMA=tma,
            FUSED=fused, GROUP=group, MAX_GROUPS=max_groups, STRIDED=TUNE.get("strided", block_n >= 1024),
            PREFETCH=min(TUNE.get("prefetch", 2), rows_per_program // block_m), **_pdl(h.device), **_stream(),
            **({"maxnreg": TUNE["maxnreg"]} if TUNE.get("maxnreg") else {}),
        )  # fmt: skip
    if fused or (m and TUNE.get("no_reduce")):  # no_reduce, sweeps only: the backward kernel alone
        return dx, dlow, dw
    if m:
        block_r, block_c = TUNE.get("reduce", _reduce_tile(programs))
        _SUM_ROWS[(cdiv(n, block_c),)](
            partial, dw, programs, n, BLOCK_R=block_r, BLOCK_N=block_c, num_warps=4,
            RELEASE=TUNE.get("reduce_release", True), **_pdl(h.device),
        )  # fmt: skip
    else:
        dw.zero_()
    return dx, dlow, dw


def _rms_norm_bwd_fake(dy, dres, h, weight, rstd, low_dtype):
    dlow = h.new_empty(h.shape, dtype=low_dtype) if low_dtype is not None else h.new_empty(0)
    return torch.empty_like(h), dlow, torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, residual, eps, out_dtype = inputs
    y, h, rstd = output
    ctx.has_res = residual is not None
    ctx.y_dtype = y.dtype
    ctx.mark_non_differentiable(rstd)
    # with a mixed-dtype add, the backward writes the gradient once more in the lower of the two dtypes
    ctx.x_low = ctx.has_res and x.dtype != h.dtype
    ctx.r_low = ctx.has_res and residual.dtype != h.dtype
    ctx.low_dtype = x.dtype if ctx.x_low else residual.dtype if ctx.r_low else None
    ctx.save_for_backward(h if residual is not None else x, weight, rstd)


def _rms_norm_backward(ctx, dy, dh_out, drstd, bwd):
    h, weight, rstd = ctx.saved_tensors
    if dy is None:  # only the returned residual was used: the normed output's gradient is zero
        dy = torch.zeros(h.shape, dtype=ctx.y_dtype, device=h.device)
    dres = dh_out.contiguous() if ctx.has_res and dh_out is not None else None
    dh, dlow, dw = bwd(dy.contiguous(), dres, h, weight, rstd, ctx.low_dtype)
    if not ctx.has_res:
        return dh, dw, None, None, None
    return (dlow if ctx.x_low else dh), dw, (dlow if ctx.r_low else dh), None, None


_rms_norm, _rms_norm_fwd, _rms_norm_bwd = op_pair(
    "rms_norm",
    _rms_norm_fwd_impl,
    _rms_norm_fwd_fake,
    _rms_norm_bwd_impl,
    _rms_norm_bwd_fake,
    _rms_norm_setup,
    _rms_norm_backward,
)


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """rms_norm_ref with Triton forward and backward kernels (same arguments, dtypes and return values)."""
    n = x.shape[-1]
    if n != weight.shape[0] or weight.dim() != 1:
        raise ValueError(f"rms_norm: last dim of x ({n}) != weight size ({tuple(weight.shape)})")
    if n > _MAX_WIDTH:
        raise ValueError(f"rms_norm_triton: rows of {n} > {_MAX_WIDTH} elements; use rms_norm_ref")
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise ValueError(f"rms_norm: out_dtype must be a floating dtype, got {out_dtype}")
    shape = x.shape
    if residual is not None:
        if residual.shape != shape:
            raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(shape)}")
        # x + residual promotes like torch does; the kernel reads mixed dtypes (e.g. a bf16 layer output onto
        # an fp32 residual stream) as they are, unless neither is the promoted dtype (fp16 + bf16): widen both
        dtype = torch.promote_types(x.dtype, residual.dtype)
        if x.dtype != dtype and residual.dtype != dtype:
            x, residual = x.to(dtype), residual.to(dtype)
    if n == 0:  # rows of no elements: nothing to normalise; the reference's empty results (and gradients)
        return rms_norm_ref(x, weight, eps, residual, out_dtype)
    if residual is not None:
        residual = residual.reshape(-1, n).contiguous()
    x2 = x.reshape(-1, n).contiguous()  # (M, N) view; copies only if rows are not contiguous
    y, h, _ = _rms_norm(x2, weight.contiguous(), residual, eps, out_dtype)
    if residual is None:
        return y.view(shape)
    return y.view(shape), h.view(shape)
