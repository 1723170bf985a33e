"""FlashAttention-2 forward and backward in Triton with the additive position bias computed in-kernel.

Semantics are exactly those of ``attention_ref`` (``ops/attention.py``): scores = scale * q k^T + bias, masked,
softmax over keys, times v; a query row with no visible key outputs zeros and gets zero gradients.

Algorithm (Dao 2023, FlashAttention-2):
- forward: one program per (query block, batch*head); online softmax over key blocks in fp32, in base 2
  (scores are pre-multiplied by log2(e) so ``exp2`` is used); stores the row logsumexp (base 2; +inf for an
  empty row so the backward's probabilities are exactly 0 there).
- backward: ``delta = rowsum(dO * O)``; a key-block kernel (dk, dv, and the position-bias gradient) that walks
  query blocks, and a query-block kernel (dq, and the dense bias gradient) that walks key blocks. Both
  recompute P from the saved logsumexp. No atomics anywhere: every output element has one writer.

Position bias kinds (constexpr ``BIAS_KIND``):
  0 none; 1 T5 relative buckets; 2 ALiBi (-slope * |j - i|); 3 an arbitrary tensor broadcastable to
  (B, H, M, N) (read through its strides, stride 0 for broadcast dims; its gradient is stored dense in fp32
  and summed over the broadcast dims afterwards).
T5 buckets: the bucket depends only on the key-minus-query distance and is constant for |distance| >= W, the
exact saturation point of the bucketing (``_saturation_width``: 92 for 32 bidirectional buckets and max
distance 128, 114 causal; at most max(max_distance, num_buckets)). The host builds (with device ops, no sync) a
per-head vector ``rb[h, W + d] = table[bucket(d), h]`` for d in [-W, W] by calling ``relative_position_bucket``
itself, so buckets are bit-identical to the reference. Tiles whose whole distance range lies beyond +-W add one
scalar; only tiles near the diagonal gather from the vector. In the backward, far tiles reduce dS to one scalar
per side; near tiles reduce dS per diagonal (a ``tl.gather`` skew) into a per-program fp32 vector over
distances. Each key-block program writes its own row of a partial buffer; one more launch
(``_table_grad_kernel``, a program per bucket and head) sums those rows and the bucket's distances in a fixed
order, so d(rel_table) is bitwise deterministic.

Inner-loop variants for the T5 bias (same function; selected per launch):
  "split": each program computes, from its tile bounds, where its tiles stop being wholly below -W
  and start being wholly beyond +W, and runs three branch-free loops (constant bias, gathered bias, constant
  bias). The near-diagonal loop steps over 16 keys (dk/dv: 16 queries) at a time ("table": 32, ``NEAR``):
  a gathered tile holds one pointer per element in registers, and at full block width the kernels hit the
  255-register limit (the dk/dv kernel spilled 600-750 bytes; sm_90a ptxas). The masked last tiles keep one small loop (forward,
  dq: gathered bias, exact on any tile; dk/dv: per-tile branch).
  (A third variant, one loop deciding per tile with a branch, was slower on the H200 and, under some
  autotuned configs, gave a wrong table gradient for a one-query decode step on the GPU; it was removed.
  The per-tile branch remains only for the masked last tiles below, at the near-step width.)
  "table" (default): as "split", but a near-diagonal tile's bias is read from a per-head Toeplitz table (rows
  q - ref + W + 256, 128 columns, ref = the tile's first key, or the key block's start in dk/dv) placed before
  the distance vector in the same buffer: contiguous rows, so vector loads with no per-element distance
  arithmetic (sm_90a forward at 128x64: 133 registers against 147 for "split"). With the same near steps it
  gave bitwise the results of "split" at 1.20x its forward and 1.10x its forward+backward (L=4096, H200, equal
  configs: benchmarks/results/attention_variants_2026-12-02.md); its near steps are now 32 wide (``NEAR``).
  Opt-in (``FAT5_ATTN_TMA=1``, ``TMA``; Hopper): the forward reads a near tile as one 2D block of the table
  through a tensor descriptor built in-kernel, in near steps of 64 keys. With bf16 / fp16 inputs the table
  (and the distance vector) is fp16 (``HALF_TABLE``, default on); opt-in ``KV_TMA``: the forward's key and
  value tiles through tensor descriptors.
  Select with ``FAT5_ATTN_VARIANT`` in the environment (read at import) or
  ``set_variant("table" | "split")``; a backward reads the layout its forward saved, whatever the
  variant is by then. Without a T5 bias all variants run the same code.

The forward op also returns (as outputs the backward saves; no gradient) the T5 distance vector and the
segment-range tables, so the backward does not rebuild them; bucket ids, bucket spans and placeholder
tensors are cached per device (built outside the private memory pool of a CUDA graph warming up; a graph
captured later reads the cached tensors, and builds without caching only what is missing).

Masks: key padding (B, N) bool; causal against query positions ``q_offset + i`` (``q_offset`` a python int
or a 0-dim integer tensor read in-kernel: no host sync, CUDA-graph safe); packed documents via segment ids.
Fully masked tiles are skipped: causal by tile bounds; segments by per-16-row/column groups whose visible
key (query) range is computed on the device (``_segment_ranges_kernel``: two launches; the torch version
``_segment_ranges_ref`` is its specification), so a program loops only over key blocks that can overlap.

Limits: dropout is not implemented (raises); head dim up to 256 (padded to a power of two, tuned for
32/64/128); decode (M of a few rows) runs but uses a 16-row query block, not a split-KV kernel; the
dense-bias gradient costs B*H*M*N fp32 of scratch; ``tl.dot`` on fp32 inputs uses IEEE fp32 (slow, meant
for tests/CPU interpreter); the T5 distance vector has next_pow2(2W+1) fp32 registers per backward program.
"""

from __future__ import annotations

# ruff: noqa: UP045  (torch.library infers the op schemas from these annotations: keep typing.Optional)
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import unset_fake_temporarily
from triton.runtime import _allocation

from ..positions import relative_position_bucket
from .attention import unpack_qkv
from .launch import Launcher, cdiv, next_pow2
from .registration import op_pair

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if _INTERPRET:
    # Triton 3.6's interpreter holds scalars as 1-element arrays and converts loop bounds with int(array),
    # which NumPy >= 2.4 rejects for non-0-d arrays; our loop bounds come from tl.minimum/maximum on scalars.
    # Re-patch __index__ to take the single element (CPU interpreter only).
    from triton.runtime import interpreter as _interp

    if not getattr(_interp, "_fat5_index_patch", False):
        _orig_patch = _interp._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):
            _orig_patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        _interp._patch_lang_tensor = _patch_lang_tensor
        _interp._fat5_index_patch = True
LOG2E = 1.4426950408889634
SEG_G = 16  # granularity (rows/columns) of the device-side segment-range tables; <= every block size

BIAS_NONE, BIAS_REL, BIAS_ALIBI, BIAS_TENSOR = 0, 1, 2, 3
# columns of the "table" variant's near-diagonal Toeplitz table: >= every BLOCK_N and BLOCK_M of the configs
NT_COLS = tl.constexpr(128)


# --------------------------------------------------------------------------------------------- configs
def _cfg(bm, bn, w, s, maxnreg=None, near=None):
    """A tile config; ``near``: the forward's near-diagonal step width for this config (NEAR_CFG), instead of
    NEAR["fwd"]."""
    kw = {"BLOCK_M": bm, "BLOCK_N": bn}
    if near is not None:
        kw["NEAR_CFG"] = near
    return triton.Config(kw, num_warps=w, num_stages=s, maxnreg=maxnreg)


# the GPU's forward configs (also read by the tests of the forward's near-step bounds, see _nt_rows)
# the last one steps 64 keys on near-diagonal tiles: with 128 registers it is the fastest L=1024 forward on the
# H200 (0.315 ms against 0.337 with 32-key steps; without the register cap 64-key steps take 0.430), and the
# slowest causal one of the 128x64 w8 configs (benchmarks/results/attention_near_sweep_2026-12-06_fwd.json). The
# 64x64 w4 config capped at 128 registers is for TAIL_TABLE, which takes the uncapped one from 128 to 138 (sm_90a):
# 3 programs per SM instead of 4 (56 KiB of shared memory each); capped it keeps 4, without spills, and it is the
# causal L=1024 pick with TAIL_TABLE on the H200 (0.222 ms pinned, benchmarks/results/2026-12-06-tail.md)
_FWD_CONFIGS_GPU = [
    _cfg(128, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3, 128),
    _cfg(128, 64, 8, 3, 128, near=64), _cfg(64, 64, 4, 3, 128),
]  # fmt: skip
# key-block kernel: BLOCK_M (queries per step) <= BLOCK_N (keys held) -- the diagonal skew needs it
# (with the T5 table gradient, offline ptxas -v for sm_90a shows the 4-warp 64/128-wide tiles spilling
# 150-1000 bytes; the 8-warp and 16-row ones below do not, so autotune can choose them)
_DKV_CONFIGS_GPU = [
    _cfg(64, 128, 8, 3), _cfg(32, 128, 8, 3), _cfg(32, 64, 8, 3), _cfg(16, 128, 8, 3),
    _cfg(64, 64, 4, 3), _cfg(32, 64, 4, 3), _cfg(16, 64, 4, 3),
]  # fmt: skip
_DQ_CONFIGS_GPU = [_cfg(128, 64, 8, 3), _cfg(128, 32, 4, 3), _cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3, 128)]
if _INTERPRET:  # the interpreter is slow and autotuning there measures nothing: one small config
    # 32-wide key (dkv: query) steps, so the 16-wide near-diagonal tiles of the split variant are exercised
    _FWD_CONFIGS = [_cfg(16, 32, 1, 1)]
    _DKV_CONFIGS = [_cfg(32, 32, 1, 1)]
    _DQ_CONFIGS = [_cfg(16, 32, 1, 1)]
else:
    # few configs: every one is compiled per (head dim, bias kind, masks) on first use
    _FWD_CONFIGS, _DKV_CONFIGS, _DQ_CONFIGS = _FWD_CONFIGS_GPU, _DKV_CONFIGS_GPU, _DQ_CONFIGS_GPU
    if (
        os.environ.get("FAT5_ATTN_AUTOTUNE", "1") == "0"
    ):  # tests: skip the tuning sweep, keep the first config
        _FWD_CONFIGS, _DKV_CONFIGS, _DQ_CONFIGS = _FWD_CONFIGS[:1], _DKV_CONFIGS[:1], _DQ_CONFIGS[:1]

# the "table" variant's Toeplitz table covers blocks of up to NT_COLS rows and columns
assert (
    max(
        max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])
        for c in _FWD_CONFIGS
        + _DKV_CONFIGS
        + _DQ_CONFIGS
        + _FWD_CONFIGS_GPU
        + _DKV_CONFIGS_GPU
        + _DQ_CONFIGS_GPU
    )
    <= NT_COLS.value
)

# near-diagonal step width (keys for the forward and dq, queries for dk/dv) of the "split" and "table" loops,
# capped by the block size; read at every launch, so a sweep (benchmarks/attention_near_sweep.py) can vary it.
# 32 was fastest on the H200 for every kernel and length swept (attention_near_sweep_2026-12-02.json); the
# interpreter's blocks are 32 wide, so it keeps 16 and its tests still walk narrower near steps than blocks
NEAR = dict.fromkeys(("fwd", "dkv", "dq"), 16 if _INTERPRET else 32)

# FAT5_ATTN_TMA=1 (read at import; ``TMA`` is read at every launch): the "table" forward loads a near step's bias
# tile as one 2D block through a tensor descriptor (TMA on Hopper) instead of one pointer per element. A tile
# then costs no pointer registers, so the forward steps 64 keys at a time (per-element pointers at 64 spilled:
# 0.496 against 0.401 ms at L=1024, H200). Off by default: 17-25% slower on the H200 with the fp32 table
# (benchmarks/results/2026-12-04-fills.md); bench_attention.py's ours_tma64 times it again. Used on compute
# capability >= 9 only (elsewhere the descriptor would be lowered to per-element pointers again); the
# interpreter keeps its narrow near steps, so its tests walk near steps narrower than blocks.
TMA = os.environ.get("FAT5_ATTN_TMA") == "1"
if TMA and not _INTERPRET:
    NEAR["fwd"] = 64

# FAT5_ATTN_KV_TMA (read at import; ``KV_TMA`` is read at every launch): the forward loads its key and value tiles
# through tensor descriptors built in-kernel (TMA on Hopper: no per-element address registers, zero fill past
# the sequence end) instead of masked pointer loads. Used where the strides allow it (``_kv_tma_ok``). Off by
# default: far fewer registers (sm_90a, d64 128x128: 218 -> 163) but a slower forward on the H100 (L=1024: 237
# against 272 TFLOP/s; benchmarks/results/2026-12-05-kvtma.md).
KV_TMA = os.environ.get("FAT5_ATTN_KV_TMA") == "1"

# HALF_TABLE (default on; FAT5_ATTN_HALF_TABLE=0 at import turns it off; read at every forward): with bf16 / fp16
# activations the T5 bias buffer (Toeplitz table and distance vector, already times log2(e)) is kept in fp16
# instead of fp32: half the bytes of every near tile's bias, and less shared memory for the pipelined loads
# (sm_90a forward 128x64 w8: 73.7 -> 65.5 KB, 126 -> 111 registers). fp16 rounds a bias b by at most |b| 2^-12
# (0.002 at |b| = 8, in log2 units), below the bf16 rounding (2^-9) the kernels already apply to the
# probabilities; a bf16 model's own bias (transformers' T5) is bf16. The backward reads the buffer its forward
# saved, so both passes see the same values; the table gradient is unaffected. H100, L=1024 (2026-12-05):
# forward 265 -> 300 TFLOP/s, causal 178 -> 220, fwd+bwd +5-7% (benchmarks/results/2026-12-05-kvtma.md).
HALF_TABLE = os.environ.get("FAT5_ATTN_HALF_TABLE", "1") != "0"

# FOLD_SCALE (default on; FAT5_ATTN_FOLD_SCALE=0 at import turns it off; read at every launch): tiles whose bias
# is one constant (no bias; the T5 tiles wholly beyond +-W; never ALiBi or a bias tensor) fold the softmax scale and that constant
# into the exponent's FFMA instead of scaling and biasing every score first (see _fwd_tiles; the backward kernels
# fold the constant into the logsumexp they subtract)
FOLD_SCALE = os.environ.get("FAT5_ATTN_FOLD_SCALE", "1") != "0"

# TAIL_TABLE (default on; FAT5_ATTN_TAIL_TABLE=0 at import turns it off; read at every forward and dq launch): the
# forward's and dq's masked last steps (the causal diagonal, the key-length tail) read the "table" variant's
# Toeplitz table instead of gathering the bias per element by distance. Exact on any tile: a row past either end
# of the table is clamped to it, and the end rows hold only saturated distances (see _near_bias). Not with the
# forward's TMA, whose block loads are not clamped. H200, median of 3 interleaved rounds, forward ms on / off:
# L=1024 causal 0.221 / 0.230, L=4096 1.048 / 1.092, causal 0.591 / 0.603, L=1024 0.324 / 0.322; fwd+bwd within
# 1% (benchmarks/results/2026-12-06-tail.md).
TAIL_TABLE = os.environ.get("FAT5_ATTN_TAIL_TABLE", "1") != "0"

# DOC_PASS (default on; FAT5_ATTN_DOC_PASS=0 at import turns it off; read at every launch): with segment ids,
# the blocks that lie in one document run in a launch of their own without per-key ids (see _seg_passes)
DOC_PASS = os.environ.get("FAT5_ATTN_DOC_PASS", "1") != "0"


# CIRC_SKEW (default 3; FAT5_ATTN_CIRC_SKEW=0, 1 or 2 at import; read at every backward launch, tuned apart): how
# the dk/dv kernel's near tiles sum dS^T per distance for the table gradient. 0: a skewed copy of WIN x BLOCK_M
# elements, summed across the warps and moved into the distance frame on every step (_rel_grad_near); 1: the same
# with a circular skew of the tile's own elements; 2: a circular skew in the absolute query position, whose sums
# stay per thread and per distance class until the loop ends (_rel_grad_defer); 3: as 2, but the tile is gathered
# through a step-independent skew and its row sums rotated (bitwise the same sums). sm_90a, 32x64 w4: 255
# registers and 108 spill bytes (0), 240 and none (1), 238 and none (2), 242 and none (3); a near step's SASS
# issues 822 / 682 / 806 / 710 instructions (410 without the table gradient). H100, L=1024, fwd+bwd TFLOP/s in
# one run (benchmarks/results/2026-12-06-deferskew.md): 209 (0), 222 (1), 229 (2); causal 148, 159, 157. H200,
# one run (2026-12-06-rotskew.md), 1 / 2 / 3: L=1024 217 / 222 / 226, causal 157 / 156 / 157; L=4096 310 / 302
# / 318, causal 264 / 259 / 265. (A fourth way, adding 3's row sums through three running slots instead of a
# select over all ZB bins, was bitwise equal to 3 and slower in fwd+bwd by 3-5% in three of five cells on an H100,
# so it was dropped: benchmarks/results/2026-12-06-tail.md.)
CIRC_SKEW = os.environ.get("FAT5_ATTN_CIRC_SKEW", "3")
if CIRC_SKEW not in ("0", "1", "2", "3"):
    raise ValueError(f"FAT5_ATTN_CIRC_SKEW={CIRC_SKEW!r}: use 0, 1, 2 or 3 (default)")
CIRC_SKEW = int(CIRC_SKEW)


def _circ_skew() -> int:
    """CIRC_SKEW, checked (a module attribute that benchmarks and tests may set)."""
    if CIRC_SKEW not in (0, 1, 2, 3):
        raise ValueError(f"attention_triton.CIRC_SKEW = {CIRC_SKEW!r}: use 0, 1, 2 or 3")
    return CIRC_SKEW


def _rbv_dtype(act_dtype: torch.dtype) -> torch.dtype:
    """dtype of the T5 bias buffer for activations of ``act_dtype`` (``HALF_TABLE``)."""
    return torch.float16 if HALF_TABLE and act_dtype in (torch.float16, torch.bfloat16) else torch.float32


# near-diagonal tiles of the "table" variant in the backward (dq, dk/dv) load the next step's bias tile before
# this step's dots (carried through the loop in registers): the table read is an L2 hit whose latency the loop
# otherwise waits for on every near step (H200, L=1024: fwd+bwd 185 -> 192 TFLOP/s). FAT5_ATTN_PREFETCH=0 (read
# at import) turns it off, for comparison.
PREFETCH = tl.constexpr(os.environ.get("FAT5_ATTN_PREFETCH", "1") != "0")

# debug aid for tests: fill outputs with NaN before the kernels write them, so an unwritten element shows
_POISON = os.environ.get("FAT5_ATTN_POISON") == "1"

# inner-loop variant for the T5 bias (see the module docstring): "table" (default) or "split"
VARIANTS = ("split", "table")
_VARIANT = os.environ.get("FAT5_ATTN_VARIANT", "table")
if _VARIANT not in VARIANTS:
    raise ValueError(f"FAT5_ATTN_VARIANT={_VARIANT!r}: choose one of {VARIANTS}")


def set_variant(name: str) -> None:
    """Select the T5-bias inner loops of the kernels launched from now on: "table" or "split"."""
    global _VARIANT
    if name not in VARIANTS:
        raise ValueError(f"unknown attention kernel variant {name!r}; choose one of {VARIANTS}")
    _VARIANT = name


def get_variant() -> str:
    return _VARIANT


def _prune_by_smem(configs, named_args, **kwargs):
    """Drop configs whose pipelined tiles cannot fit in shared memory (Hopper: 227 KiB per block)."""
    bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    limit = 227 * 1024
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        limit = getattr(props, "shared_memory_per_block_optin", limit)
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        # every loop stage streams 2 tiles (k, v or q, dO) of the moving side at 2 bytes per element,
        # plus the fp32 score tile used by the diagonal skew / conversions
        est = c.num_stages * 2 * max(bm, bn) * bd * 2 + bm * bn * 4
        if est <= limit:
            kept.append(c)
    return kept or configs[-1:]


# --------------------------------------------------------------------------------------------- helpers
# REL_MODE: which T5 bias a loop adds. TILE decides per tile (the masked last tiles); the main loops run
# separate branch-free loops over the tiles it already knows to be far below -W (LO), near (NEAR) or far
# beyond +W (HI). NEAR gathers with clamped distances, so it is exact on any tile.
REL_LO, REL_NEAR, REL_HI, REL_TILE = -1, 0, 1, 2


@triton.jit
def _split_bounds(start, end, first_near, first_far, STEP: tl.constexpr):
    """Split the tiles start, start + STEP, ... < end into [start, e1) before ``first_near``, [e1, e2) and
    [e2, end) from ``first_far`` on: e1 (e2) is the first tile start >= first_near (first_far), clamped."""
    e1 = start + (tl.maximum(first_near - start, 0) + STEP - 1) // STEP * STEP
    e2 = start + (tl.maximum(first_far - start, 0) + STEP - 1) // STEP * STEP
    e1 = tl.minimum(e1, tl.maximum(end, start))
    e2 = tl.minimum(tl.maximum(e2, e1), tl.maximum(end, start))
    return e1, e2


@triton.jit
def _group_span(LO, HI, first, NG, length, GROUPS: tl.constexpr):
    """(min LO[g], max HI[g]) over the block's GROUPS segment groups first, first + 1, ... (those past the last
    group NG - 1 read the last one again, which lies in the block: first <= NG - 1); start values (length, 0).
    Scalar loads: a vector load reduced with tl.min / tl.max gave the same bounds but cost the 128x64 forward
    43 more registers (sm_90a ptxas: 160 against 117 with the segment masking left out)."""
    lo = length
    hi = 0
    for i in tl.static_range(GROUPS):
        g = tl.minimum(first + i, NG - 1)
        lo = tl.minimum(lo, tl.load(LO + g))
        hi = tl.maximum(hi, tl.load(HI + g))
    return lo, hi


@triton.jit
def _doc_block(DLO, DHI, first, NG, GROUPS: tl.constexpr):
    """(lo, hi, one): ``one`` when the GROUPS groups first, first + 1, ... (those past the last group NG - 1 read
    the last one again, which lies in the block) are all one document whose other side is exactly [lo, hi)
    (``_doc_ranges_kernel``: the same range, not -1, in every group). Scalar loads, as ``_group_span``."""
    lo = tl.load(DLO + first)
    hi = tl.load(DHI + first)
    one = lo >= 0
    for i in tl.static_range(1, GROUPS):
        g = tl.minimum(first + i, NG - 1)
        one = one & (tl.load(DLO + g) == lo) & (tl.load(DHI + g) == hi)
    return lo, hi, one


@triton.jit
def _near_bias(RB_h, qpos2, kpos2, ref, W):
    """Near-diagonal bias tile from the per-head Toeplitz table (the "table" variant): row q - ref + W + 2 K,
    column k - ref (K = NT_COLS), with ref the tile's first key (forward, dq) or the key block's (dk/dv); the
    rows are contiguous, so these are vector loads with no per-element distance arithmetic. The forward's near
    steps stay inside the table (``_nt_rows``); in the backward a row can fall outside it on a step that lies
    wholly beyond +-W (or on the step after the last, which the prefetching loops load and never use):
    clamping the row is exact and in bounds, since the table saturates at both ends (row 0 holds distances
    >= W, the last row distances <= -W)."""
    nt_h = RB_h - (2 * W + 4 * NT_COLS) * NT_COLS
    row = tl.minimum(tl.maximum(qpos2 - ref + W + 2 * NT_COLS, 0), 2 * W + 4 * NT_COLS - 1)
    return tl.load(nt_h + row * NT_COLS + (kpos2 - ref)).to(tl.float32)


@triton.jit
def _add_bias(
    s,
    BIAS_KIND: tl.constexpr,
    RB_h,
    b_lo,
    b_hi,
    slope,
    bias_ptrs,
    bias_mask,
    rel_lo,
    rel_hi,
    kpos2,
    qpos2,
    ref,
    W,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    REL_MODE: tl.constexpr,
):
    if BIAS_KIND == 1:
        # every branch yields the score tile itself (MMA layout): a branch that yields a separate bias tile
        # gets its own layout and costs a shared-memory layout conversion of the whole tile on every tile
        if REL_MODE == 2:
            if rel_lo >= W:
                s += b_hi
            elif rel_hi <= -W:
                s += b_lo
            else:
                s += tl.load(RB_h + tl.minimum(tl.maximum(kpos2 - qpos2, -W), W) + W).to(tl.float32)
        elif REL_MODE == 0:
            s += tl.load(RB_h + tl.minimum(tl.maximum(kpos2 - qpos2, -W), W) + W).to(tl.float32)
        elif REL_MODE == 3:
            s += _near_bias(RB_h, qpos2, kpos2, ref, W)
        elif REL_MODE == 4:  # a near tile whose bias the loop prefetched and added itself
            s = s
        elif REL_MODE == -1:
            s += b_lo
        else:
            s += b_hi
    elif BIAS_KIND == 2:
        s += slope * tl.abs(kpos2 - qpos2).to(tl.float32)
    elif BIAS_KIND == 3:
        s += tl.load(bias_ptrs, mask=bias_mask, other=0.0).to(tl.float32) * 1.4426950408889634
    return s


@triton.jit
def _rel_grad(
    dsT,
    acc_rel,
    v_lo,
    v_hi,
    w_lo,
    w_hi,
    rel_lo,
    rel_hi,
    R0,
    W,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WIN: tl.constexpr,
    RB: tl.constexpr,
    REL_MODE: tl.constexpr,
    CIRC: tl.constexpr = False,
):
    """Accumulate dS^T (keys x queries, distance R0 + n - m) into per-distance sums: acc_rel over (-W, W); the
    clamped ends stay vectors until the loop ends (``_rel_ends``), so a tile costs no cross-warp reduction: a
    tile wholly beyond +W (below -W) adds its per-key row sums to v_hi (v_lo); a near tile is skewed so that
    each diagonal (one distance) becomes a row, and its diagonals at or beyond +-W go to w_hi / w_lo."""
    if REL_MODE == 2:
        if rel_lo >= W:
            v_hi += tl.sum(dsT, 1)
        elif rel_hi <= -W:
            v_lo += tl.sum(dsT, 1)
        else:
            acc_rel, w_lo, w_hi = _rel_grad_near(
                dsT, acc_rel, w_lo, w_hi, R0, W, BLOCK_M, BLOCK_N, WIN, RB, CIRC
            )
    elif REL_MODE == 1:
        v_hi += tl.sum(dsT, 1)
    elif REL_MODE == -1:
        v_lo += tl.sum(dsT, 1)
    else:
        acc_rel, w_lo, w_hi = _rel_grad_near(dsT, acc_rel, w_lo, w_hi, R0, W, BLOCK_M, BLOCK_N, WIN, RB, CIRC)
    return acc_rel, v_lo, v_hi, w_lo, w_hi


@triton.jit
def _rel_grad_near(
    dsT,
    acc_rel,
    w_lo,
    w_hi,
    R0,
    W,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WIN: tl.constexpr,
    RB: tl.constexpr,
    CIRC: tl.constexpr = False,
):
    """A near tile's per-distance sums. The diagonals of dS^T (key n - query m = u, u from -(BLOCK_M - 1) to
    BLOCK_N - 1) become rows of a skewed copy (a gather along the keys), summed along the queries; then the
    sums move into the distance frame of acc_rel (R0 + u, offset by W), those at or beyond +-W into w_lo / w_hi.
    CIRC: the skew is circular, x[u, m] = dS^T[(u + m) mod BLOCK_N, m], so it gathers the tile's own BLOCK_N x
    BLOCK_M elements instead of WIN x BLOCK_M (WIN = 2 BLOCK_N); an element whose row wrapped lies on diagonal
    u - BLOCK_N, so each row gives two sums (unwrapped and wrapped elements) in one reduction."""
    if CIRC:
        tl.static_assert(WIN == 2 * BLOCK_N)
        t = tl.arange(0, BLOCK_N)[:, None] + tl.arange(0, BLOCK_M)[None, :]
        x = tl.gather(dsT, t & (BLOCK_N - 1), axis=0)  # (BLOCK_N, BLOCK_M)
        wrap = t >= BLOCK_N
        # (BLOCK_N, 2): [wrapped (u - BLOCK_N), not wrapped (u)] per row, then laid out as distances -BLOCK_N..
        pair = tl.sum(tl.join(tl.where(wrap, x, 0.0), tl.where(wrap, 0.0, x)), 1)
        diag = tl.reshape(tl.permute(pair, (1, 0)), (WIN,))  # index i: u = i - BLOCK_N
        lead: tl.constexpr = BLOCK_N
    else:
        dd = tl.arange(0, WIN)[:, None]
        mm = tl.arange(0, BLOCK_M)[None, :]
        nidx = dd - (BLOCK_M - 1) + mm  # row of dsT on diagonal dd at column mm
        ok = (nidx >= 0) & (nidx < BLOCK_N)
        x = tl.gather(dsT, tl.where(ok, nidx, 0), axis=0)  # (WIN, BLOCK_M)
        diag = tl.sum(tl.where(ok, x, 0.0), 1)  # (WIN,): sum of one diagonal = one distance
        lead: tl.constexpr = BLOCK_M - 1
    drel = R0 - lead + tl.arange(0, WIN)
    w_lo += tl.where(drel <= -W, diag, 0.0)
    w_hi += tl.where(drel >= W, diag, 0.0)
    acc_rel = _into_frame(acc_rel, diag, R0 - lead, W, WIN, RB)
    return acc_rel, w_lo, w_hi


@triton.jit
def _into_frame(acc_rel, sums, first, W, LEN: tl.constexpr, RB: tl.constexpr):
    """acc_rel[r] (distance r - W) += sums[i] (distance first + i), for the distances strictly inside +-W."""
    r = tl.arange(0, RB)
    src = r - W - first
    okr = (r > 0) & (r < 2 * W) & (src >= 0) & (src < LEN)
    return acc_rel + tl.where(okr, tl.gather(sums, tl.where(okr, src, 0), axis=0), 0.0)


# query positions are negative for queries at a negative offset: the near-sum skews shift them by this multiple of
# every BLOCK_N, so that // and % (which truncate) floor
_QSHIFT = tl.constexpr(1 << 24)


@triton.jit
def _rel_grad_defer(
    dsT,
    acc_b,
    k0,
    qp0,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ZB: tl.constexpr,
    ROT: tl.constexpr = False,
):
    """A near tile's per-distance sums kept per thread until the loop ends (``CIRC_SKEW`` 2 and 3). The skew is
    circular in the absolute query position: x[u, m] = dS^T[(u + q) mod BLOCK_N, m] for query q = qp0 + m, so
    the element's distance k0 + n - q is u + BLOCK_N z, with z = k0 / BLOCK_N - floor((u + q) / BLOCK_N): row u
    of every step holds the distances = u (mod BLOCK_N), and a row of one step spans two values of z. The
    tile's columns are summed only within each of NC column groups (the warps' share in the blocked layout
    the gather uses), per row and per value of z, into acc_b (BLOCK_N, ZB, NC): bin b is z = b - ZB / 2. No
    per-step reduction across warps and no move into the distance frame; ``_rel_defer_ends`` does both once.
    ROT (``CIRC_SKEW`` 3): the same sums, with the tile gathered through the step-independent skew
    x'[v, m] = dS^T[(v + m) mod BLOCK_N, m] (its lane and register arithmetic is the same on every step) and its
    per-row sums rotated by qp0 mod BLOCK_N afterwards: row u of x is row (u + qp0) mod BLOCK_N of x', and an
    element wrapped once more than its row's first exactly when v + m >= BLOCK_N. The rotation moves 2 x NC
    sums per row instead of a tile, and every sum adds the same elements in the same order as without ROT."""
    qs = qp0 + _QSHIFT
    a = tl.arange(0, BLOCK_N)[:, None] + qs % BLOCK_N
    f0 = a // BLOCK_N  # (BLOCK_N, 1): floor((u + qp0) / BLOCK_N) - floor(qp0 / BLOCK_N), 0 or 1
    # each branch gathers on its own (a gather shared after them compiled 2 differently: other registers and
    # schedule than the code it was timed with)
    if ROT:
        sa, sb = _rot_sums(dsT, a, BLOCK_M, BLOCK_N)
    else:
        t = a + tl.arange(0, BLOCK_M)[None, :]
        x = tl.gather(dsT, t & (BLOCK_N - 1), axis=0)  # (BLOCK_N, BLOCK_M), rows u
        more = (t // BLOCK_N) != f0  # the column wrapped once more than the row's first: z one lower
        sa, sb = _split_sums(x, more, BLOCK_M, BLOCK_N)
    zq = _step_bin(k0, qp0, BLOCK_N, ZB)
    ba = (zq - f0)[:, :, None]  # bin of the row's first z
    bins = tl.arange(0, ZB)[None, :, None]
    if ROT:
        acc_b += tl.where(bins == ba, sa, tl.where(bins == ba - 1, sb, 0.0))
    else:
        acc_b += tl.where(bins == ba, sa, 0.0) + tl.where(bins == ba - 1, sb, 0.0)
    return acc_b


@triton.jit
def _split_sums(x, more, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row sums of a skewed near tile x within each of NC column groups (the warps' share in the blocked layout
    the gather uses), split by ``more``: sa of the elements whose column did not wrap once more than the row's
    first, sb of those that did; each (BLOCK_N, 1, NC)."""
    NC: tl.constexpr = 4 if BLOCK_M >= 4 else BLOCK_M
    xr = tl.reshape(x, [BLOCK_N, BLOCK_M // NC, NC])
    mr = tl.reshape(more, [BLOCK_N, BLOCK_M // NC, NC])
    # the bins in the middle axis, where the reshaped tile's in-thread columns were: the sums go back into the
    # tile's own layout, so the accumulator needs no layout conversion per step
    sa = tl.sum(tl.where(mr, 0.0, xr), 1)[:, None, :]
    sb = tl.sum(tl.where(mr, xr, 0.0), 1)[:, None, :]
    return sa, sb


@triton.jit
def _rot_sums(dsT, a, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The row sums of a near tile gathered through the step-independent skew x'[v, m] = dS^T[(v + m) mod BLOCK_N,
    m], per column group, split by whether the element wrapped once more than its row's first (sa: not, sb:
    did), then rotated into the rows u of ``_rel_grad_defer`` (a: u + qp0 mod BLOCK_N, shifted)."""
    NC: tl.constexpr = 4 if BLOCK_M >= 4 else BLOCK_M
    t = tl.arange(0, BLOCK_N)[:, None] + tl.arange(0, BLOCK_M)[None, :]
    x = tl.gather(dsT, t & (BLOCK_N - 1), axis=0)  # (BLOCK_N, BLOCK_M), rows v
    sa, sb = _split_sums(x, t >= BLOCK_N, BLOCK_M, BLOCK_N)
    # row u of the sums <- row (u + qp0) mod BLOCK_N
    rot = tl.broadcast_to((a & (BLOCK_N - 1))[:, :, None], [BLOCK_N, 1, NC])
    return tl.gather(sa, rot, axis=0), tl.gather(sb, rot, axis=0)


@triton.jit
def _step_bin(k0, qp0, BLOCK_N: tl.constexpr, ZB: tl.constexpr):
    """The bin (of ``_rel_grad_defer``'s acc_b) of a near step's highest z, k0 / BLOCK_N - floor(qp0 / BLOCK_N):
    the first z of the rows u with u + qp0 mod BLOCK_N < BLOCK_N."""
    return k0 // BLOCK_N - (qp0 + _QSHIFT) // BLOCK_N + _QSHIFT // BLOCK_N + ZB // 2


@triton.jit
def _rel_defer_ends(acc_b, acc_rel, s_lo, s_hi, W, BLOCK_N: tl.constexpr, ZB: tl.constexpr, RB: tl.constexpr):
    """acc_b (``_rel_grad_defer``) summed over its column groups and moved into the distance frame of acc_rel
    (distance + W), the distances at or beyond +-W into s_lo / s_hi."""
    frame = tl.reshape(tl.trans(tl.sum(acc_b, 2)), [ZB * BLOCK_N])  # index i: distance i - ZB / 2 * BLOCK_N
    dist = tl.arange(0, ZB * BLOCK_N) - (ZB // 2) * BLOCK_N
    s_lo += tl.sum(tl.where(dist <= -W, frame, 0.0), 0)
    s_hi += tl.sum(tl.where(dist >= W, frame, 0.0), 0)
    acc_rel = _into_frame(acc_rel, frame, -(ZB // 2) * BLOCK_N, W, ZB * BLOCK_N, RB)
    return acc_rel, s_lo, s_hi


@triton.jit
def _q_offset(QOFF, q_off_int, QOFF_FROM_PTR: tl.constexpr):
    if QOFF_FROM_PTR:
        q_off = tl.load(QOFF).to(tl.int32)
    else:
        q_off = q_off_int
    return q_off


# --------------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    qpos,
    qseg,
    K_bh,
    V_bh,
    KD,
    VD,
    KDN,
    VDN,
    KPM_b,
    KSEG_b,
    BIAS_bh,
    RB_h,
    NT,
    nt_row,
    b_lo,
    b_hi,
    slope,
    offs_m,
    offs_d,
    start,
    end,
    qp0,
    qk_scale,
    M,
    N,
    D,
    W,
    skn,
    skd,
    svn,
    svd,
    sbm,
    sbn,
    skp,
    sks,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NPART: tl.constexpr,
    REL_MODE: tl.constexpr,
    NEAR_N: tl.constexpr,
    TMA: tl.constexpr,
    KV_TMA: tl.constexpr,
    k_lo=0,
    jump_at=0,
    jump=0,
    LOWER: tl.constexpr = False,
    POS_SCALE: tl.constexpr = False,
):
    # NPART 1: one loop over [start, end) adding the T5 bias by REL_MODE; NPART 3 ("split" variant): three
    # branch-free loops, tiles wholly below -W (distance = key - query), near the diagonal, wholly beyond +W
    e1 = start
    e2 = end
    if NPART == 3:
        e1, e2 = _split_bounds(start, end, qp0 - W - BLOCK_N + 2, qp0 + BLOCK_M - 1 + W, BLOCK_N)
    for part in tl.static_range(NPART):
        p_lo = start if part == 0 else (e1 if part == 1 else e2)
        p_hi = end if part == NPART - 1 else (e1 if part == 0 else e2)
        acc, l_i, m_i = _fwd_tiles(
            acc,
            l_i,
            m_i,
            q,
            qpos,
            qseg,
            K_bh,
            V_bh,
            KDN if (NPART == 3 and part == 1) else KD,  # descriptors of the step's key block width
            VDN if (NPART == 3 and part == 1) else VD,
            KPM_b,
            KSEG_b,
            BIAS_bh,
            RB_h,
            NT,
            nt_row,
            b_lo,
            b_hi,
            slope,
            offs_m,
            offs_d,
            p_lo,
            p_hi,
            qp0,
            qk_scale,
            M,
            N,
            D,
            W,
            skn,
            skd,
            svn,
            svd,
            sbm,
            sbn,
            skp,
            sks,
            MASK,
            CAUSAL,
            BIAS_KIND,
            HAS_KPM,
            HAS_SEG,
            DOT_PREC,
            BLOCK_M,
            BLOCK_N if (NPART == 1 or part != 1) else NEAR_N,
            REL_MODE if NPART == 1 else (3 if (part == 1 and REL_MODE == 3) else part - 1),
            TMA,
            KV_TMA,
            k_lo,
            jump_at,
            jump,
            LOWER,
            POS_SCALE,
        )
    return acc, l_i, m_i


@triton.jit
def _fwd_tiles(
    acc,
    l_i,
    m_i,
    q,
    qpos,
    qseg,
    K_bh,
    V_bh,
    KD,
    VD,
    KPM_b,
    KSEG_b,
    BIAS_bh,
    RB_h,
    NT,
    nt_row,
    b_lo,
    b_hi,
    slope,
    offs_m,
    offs_d,
    start,
    end,
    qp0,
    qk_scale,
    M,
    N,
    D,
    W,
    skn,
    skd,
    svn,
    svd,
    sbm,
    sbn,
    skp,
    sks,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    REL_MODE: tl.constexpr,
    TMA: tl.constexpr,
    KV_TMA: tl.constexpr,
    k_lo=0,
    jump_at=0,
    jump=0,
    LOWER: tl.constexpr = False,
    POS_SCALE: tl.constexpr = False,
):
    # FOLD: a tile whose bias is one constant c (no bias: c = 0; T5: the tiles wholly beyond +-W) keeps the raw
    # scores, takes its row maxima from them (a positive scale keeps their order: POS_SCALE) and computes
    # p = exp2(raw * scale - (m - c)): one FFMA per element where the scaled, biased score costs a FFMA (or FMUL)
    # and a FADD; the masks set raw scores to -inf, which a positive scale keeps
    FOLD: tl.constexpr = POS_SCALE and (
        BIAS_KIND == 0 or (BIAS_KIND == 1 and (REL_MODE == -1 or REL_MODE == 1))
    )
    c = 0.0
    if FOLD and BIAS_KIND == 1:
        c = b_lo if REL_MODE == -1 else b_hi
    # no prefetch of the near bias here (unlike dq and dk/dv): it took the 8-warp 128x64 forward from 126 to
    # 169 registers (one program per SM instead of two) and the forward from 362 to 337 TFLOP/s at L=4096
    for start_n in range(start, end, BLOCK_N):
        if LOWER:  # the document pass's masked steps: its first tile, then (from jump_at on) its last ones
            start_n = tl.where(start_n >= jump_at, start_n + jump, start_n)
        start_n = tl.multiple_of(start_n, BLOCK_N)
        kpos = start_n + tl.arange(0, BLOCK_N)
        if KV_TMA:  # (BLOCK_N, BLOCK_D) block of the head's (N, D) keys, zero past N and D
            k = KD.load([start_n, 0])
        else:
            kmask = (kpos[:, None] < N) & (offs_d[None, :] < D)
            k = tl.load(K_bh + kpos[:, None] * skn + offs_d[None, :] * skd, mask=kmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if not FOLD:
            s = s * qk_scale
        if REL_MODE == 3 and TMA:
            # the near tile's bias as one block of the Toeplitz table (rows of queries qp0.., columns of keys
            # start_n..): the same values _near_bias gathers, and _add_bias below adds nothing (mode 4)
            s += NT.load([nt_row + qp0 - start_n, 0]).to(tl.float32)
        rel_lo = start_n - (qp0 + BLOCK_M - 1)
        rel_hi = start_n + BLOCK_N - 1 - qp0
        if not FOLD:
            s = _add_bias(
                s,
                BIAS_KIND,
                RB_h,
                b_lo,
                b_hi,
                slope,
                BIAS_bh + offs_m[:, None] * sbm + kpos[None, :] * sbn,
                (offs_m[:, None] < M) & (kpos[None, :] < N),
                rel_lo,
                rel_hi,
                kpos[None, :],
                qpos[:, None],
                start_n,
                W,
                BLOCK_M,
                BLOCK_N,
                4 if (REL_MODE == 3 and TMA) else REL_MODE,
            )
        if MASK:
            if LOWER:  # keys in [k_lo, N): one unsigned compare
                keep = (kpos - k_lo).to(tl.uint32)[None, :] < (N - k_lo).to(tl.uint32)
            else:
                keep = kpos[None, :] < N
            if CAUSAL:
                keep = keep & (kpos[None, :] <= qpos[:, None])
            s = tl.where(keep, s, float("-inf"))
        if HAS_KPM:
            kp = tl.load(KPM_b + kpos * skp, mask=kpos < N, other=0)
            s = tl.where(kp[None, :] != 0, s, float("-inf"))
        if HAS_SEG:
            ks = tl.load(KSEG_b + kpos * sks, mask=kpos < N, other=-3)
            s = tl.where(qseg[:, None] == ks[None, :], s, float("-inf"))
        if FOLD:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale + c)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        if FOLD:
            p = tl.math.exp2(s * qk_scale - (m_safe - c)[:, None])
        else:
            p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if KV_TMA:
            v = VD.load([start_n, 0])
        else:
            vmask = (kpos[:, None] < N) & (offs_d[None, :] < D)
            v = tl.load(V_bh + kpos[:, None] * svn + offs_d[None, :] * svd, mask=vmask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


# what every attention kernel is tuned apart by (each adds its own settings, then the length buckets)
_TUNE_KEY = ["BLOCK_D", "BIAS_KIND", "CAUSAL", "HAS_SEG", "SEG_PASS", "NPART"]


@triton.autotune(
    configs=_FWD_CONFIGS,
    key=[
        *_TUNE_KEY,
        "TMA",
        "KV_TMA",
        "POS_SCALE",
        "TAIL",  # the tail's table reads take the 64x64 w4 pick to 138 registers: its capped twin must compete
        "M_BUCKET",
        "N_BUCKET",
    ],
)
# near-diagonal tiles: "split" steps 16 keys (a gather holds one pointer per element in registers, and at
# full width it pushes the kernel to the register limit: 255 at 128x64, half the occupancy); "table" NEAR["fwd"],
# or the config's own width (NEAR_CFG)
@triton.heuristics(
    {"NEAR_N": lambda a: min(a["BLOCK_N"], (a.get("NEAR_CFG") or NEAR["fwd"]) if a["NEAR_TABLE"] else 16)}
)
@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    RBV,
    BIAS,
    KPM,
    QSEG,
    KSEG,
    KVLO,
    KVHI,
    DLO,
    DHI,
    QOFF,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sob,
    soh,
    som,
    sod,
    sbb,
    sbh,
    sbm,
    sbn,
    skpb,
    skp,
    sqsb,
    sqs,
    sksb,
    sks,
    H,
    M,
    N,
    D,
    NGQ,
    q_off_int,
    qk_scale,
    W,
    M_BUCKET,
    N_BUCKET,
    BIAS_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    SEG_PASS: tl.constexpr,
    SEG_MAXB: tl.constexpr,
    QOFF_FROM_PTR: tl.constexpr,
    DOT_PREC: tl.constexpr,
    NPART: tl.constexpr,
    NEAR_TABLE: tl.constexpr,
    TMA: tl.constexpr,
    KV_TMA: tl.constexpr,
    RBW: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NEAR_N: tl.constexpr,
    POS_SCALE: tl.constexpr = False,
    NEAR_CFG: tl.constexpr = 0,
    TAIL: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_off = _q_offset(QOFF, q_off_int, QOFF_FROM_PTR)
    qpos = q_off + offs_m
    qmask = (offs_m[:, None] < M) & (offs_d[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=qmask, other=0.0)

    # key range that can be visible to this block
    lo = 0
    hi = N
    n_end = N  # keys past it are masked in the last tiles
    if CAUSAL:
        hi = tl.minimum(hi, q_off + m0 + BLOCK_M)
    qseg = offs_m
    if SEG_PASS == 1:  # document pass: blocks of one document, whose keys are [d_lo, d_hi); no per-key ids
        d_lo, d_hi, one = _doc_block(DLO + b * NGQ, DHI + b * NGQ, m0 // 16, NGQ, BLOCK_M // 16)
        if not one:
            return
        lo = d_lo
        hi = tl.minimum(hi, d_hi)
        n_end = d_hi
    if HAS_SEG:
        if SEG_PASS == 2:  # the blocks the document pass left (see _forward)
            _, _, one = _doc_block(
                DLO + b * NGQ, DHI + b * NGQ, m0 // SEG_MAXB * (SEG_MAXB // 16), NGQ, SEG_MAXB // 16
            )
            if one:
                return
        qseg = tl.load(QSEG + b * sqsb + offs_m * sqs, mask=offs_m < M, other=-2)
        lo, hi_seg = _group_span(KVLO + b * NGQ, KVHI + b * NGQ, m0 // 16, NGQ, N, BLOCK_M // 16)
        hi = tl.minimum(hi, hi_seg)
    k_first = lo
    lo = tl.maximum(lo, 0) // BLOCK_N * BLOCK_N
    # [lo, mid): whole tiles that need neither the causal nor the key-length mask
    full_end = hi
    if CAUSAL:
        full_end = tl.minimum(hi, q_off + m0 + 1)
    mid = lo + tl.maximum(full_end - lo, 0) // BLOCK_N * BLOCK_N

    RB_h = RBV
    b_lo = 0.0
    b_hi = 0.0
    slope = 0.0
    NT = RBV  # the near steps' tensor descriptor (TMA), else unused
    nt_row = 0
    if BIAS_KIND == 1:
        RB_h = RBV + h * RBW
        if NEAR_TABLE:  # the Toeplitz table comes first in each head's row (see _rel_index)
            RB_h += (2 * W + 4 * NT_COLS) * NT_COLS
            if TMA:
                # all heads' rows as one (H * RBW / K, K) matrix (RBW is a multiple of K = NT_COLS); a near
                # step's tile is the block at row nt_row + qp0 - (its first key), column 0, and stays in the
                # head's table (_nt_rows), so the descriptor's zero padding is never used
                NT = tl.make_tensor_descriptor(
                    RBV,
                    shape=[H * (RBW // NT_COLS), NT_COLS],
                    strides=[NT_COLS, 1],
                    block_shape=[BLOCK_M, NEAR_N],
                )
                nt_row = (pid_bh % H) * (RBW // NT_COLS) + W + 2 * NT_COLS
        b_lo = tl.load(RB_h).to(tl.float32)
        b_hi = tl.load(RB_h + 2 * W).to(tl.float32)
    if BIAS_KIND == 2:
        slope = tl.load(RBV + h)
    BIAS_bh = BIAS
    if BIAS_KIND == 3:
        BIAS_bh = BIAS + b * sbb + h * sbh
    KPM_b = KPM
    if HAS_KPM:
        KPM_b = KPM + b * skpb
    KSEG_b = KSEG
    if HAS_SEG:
        KSEG_b = KSEG + b * sksb

    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    K_bh = K + b * skb + h * skh
    V_bh = V + b * svb + h * svh
    KD, VD, KDN, VDN = K_bh, V_bh, K_bh, V_bh  # key / value descriptors (KV_TMA), else unused
    if KV_TMA:  # one per block width: BLOCK_N, and the near steps' and masked tail's NEAR_N if narrower
        KD = tl.make_tensor_descriptor(K_bh, shape=[N, D], strides=[skn, 1], block_shape=[BLOCK_N, BLOCK_D])
        VD = tl.make_tensor_descriptor(V_bh, shape=[N, D], strides=[svn, 1], block_shape=[BLOCK_N, BLOCK_D])
        KDN, VDN = KD, VD
        if NPART == 3 and NEAR_N != BLOCK_N:
            KDN = tl.make_tensor_descriptor(
                K_bh, shape=[N, D], strides=[skn, 1], block_shape=[NEAR_N, BLOCK_D]
            )
            VDN = tl.make_tensor_descriptor(
                V_bh, shape=[N, D], strides=[svn, 1], block_shape=[NEAR_N, BLOCK_D]
            )
    t_start = mid  # the masked steps: [mid, hi), in the document pass also its first tile (see below)
    t_end = hi
    jump_at = 0
    if SEG_PASS == 1:
        # a document that starts inside a tile: that tile joins the masked steps, with the keys before the
        # document masked, and the main loop starts at the next tile (a main loop that starts at an unaligned
        # key costs the 128x64 forward 80 more registers, a separate loop for the first tile 40): the masked
        # loop walks [lo, head_end) and then jumps to [mid, hi)
        head_end = tl.where(k_first > lo, lo + BLOCK_N, lo)
        t_start = lo
        jump_at = head_end
        lo = head_end
        mid = lo + tl.maximum(full_end - lo, 0) // BLOCK_N * BLOCK_N
        t_end = tl.minimum(head_end, hi) + tl.maximum(hi - mid, 0)
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        qpos,
        qseg,
        K_bh,
        V_bh,
        KD,
        VD,
        KDN,
        VDN,
        KPM_b,
        KSEG_b,
        BIAS_bh,
        RB_h,
        NT,
        nt_row,
        b_lo,
        b_hi,
        slope,
        offs_m,
        offs_d,
        lo,
        mid,
        q_off + m0,
        qk_scale,
        M,
        N,
        D,
        W,
        skn,
        skd,
        svn,
        svd,
        sbm,
        sbn,
        skp,
        sks,
        False,
        CAUSAL,
        BIAS_KIND,
        HAS_KPM,
        HAS_SEG,
        DOT_PREC,
        BLOCK_M,
        BLOCK_N,
        NPART,
        3 if NEAR_TABLE else 2,
        NEAR_N,
        TMA,
        KV_TMA,
        POS_SCALE=POS_SCALE,
    )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        qpos,
        qseg,
        K_bh,
        V_bh,
        KDN if NPART == 3 else KD,  # the masked tail steps NEAR_N keys when NPART is 3
        VDN if NPART == 3 else VD,
        KDN,
        VDN,
        KPM_b,
        KSEG_b,
        BIAS_bh,
        RB_h,
        NT,
        nt_row,
        b_lo,
        b_hi,
        slope,
        offs_m,
        offs_d,
        t_start,
        t_end,
        q_off + m0,
        qk_scale,
        M,
        n_end,
        D,
        W,
        skn,
        skd,
        svn,
        svd,
        sbm,
        sbn,
        skp,
        sks,
        True,
        CAUSAL,
        BIAS_KIND,
        HAS_KPM,
        HAS_SEG,
        DOT_PREC,
        BLOCK_M,
        NEAR_N if NPART == 3 else BLOCK_N,
        1,
        # the last tile(s): gathering is exact on any tile, and so is the clamped table (TAIL_TABLE)
        (3 if TAIL else 0) if NPART == 3 else 2,
        NEAR_N,
        TMA,
        KV_TMA,
        k_first,
        jump_at,
        mid - jump_at,
        SEG_PASS == 1,
        POS_SCALE,
    )
    empty = l_i == 0.0  # no visible key: output zeros, lse=+inf makes the backward's P exactly 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(
        O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
        out.to(O.dtype.element_ty),
        mask=qmask,
    )
    tl.store(LSE + pid_bh.to(tl.int64) * M + offs_m, lse, mask=offs_m < M)


# --------------------------------------------------------------------------------------------- backward
@triton.jit
def _delta_kernel(
    O,
    DO,
    DELTA,
    sob,
    soh,
    som,
    sod,
    sdob,
    sdoh,
    sdom,
    sdod,
    H,
    M,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < M) & (offs_d[None, :] < D)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(
        DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod, mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * M + offs_m, delta, mask=offs_m < M)


@triton.jit
def _dkv_inner(
    dk,
    dv,
    acc_rel,
    s_lo,
    s_hi,
    k,
    v,
    kpos,
    kseg,
    kp,
    Q_bh,
    DO_bh,
    LSE_bh,
    DELTA_bh,
    QSEG_b,
    RB_h,
    b_lo,
    b_hi,
    slope,
    BIAS_bh,
    offs_d,
    start,
    end,
    q_off,
    k0,
    qk_scale,
    M,
    N,
    D,
    W,
    sqm,
    sqd,
    sdom,
    sdod,
    sbm,
    sbn,
    sqs,
    MASK: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    REL_GRAD: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WIN: tl.constexpr,
    RB: tl.constexpr,
    NPART: tl.constexpr,
    REL_MODE: tl.constexpr,
    NEAR_M: tl.constexpr,
    NEAR_WIN: tl.constexpr,
    ALIGNED: tl.constexpr,
    CIRC: tl.constexpr = 0,
    ZB: tl.constexpr = 8,
    FOLD: tl.constexpr = False,
):
    # as _fwd_inner; here distance = k0 - query falls as the loop goes on: beyond +W, near, below -W
    e1 = start
    e2 = end
    if NPART == 3:
        e1, e2 = _split_bounds(
            start, end, k0 - q_off - BLOCK_M + 2 - W, k0 + BLOCK_N - 1 + W - q_off, BLOCK_M
        )
    for part in tl.static_range(NPART):
        p_lo = start if part == 0 else (e1 if part == 1 else e2)
        p_hi = end if part == NPART - 1 else (e1 if part == 0 else e2)
        dk, dv, acc_rel, s_lo, s_hi = _dkv_tiles(
            dk,
            dv,
            acc_rel,
            s_lo,
            s_hi,
            k,
            v,
            kpos,
            kseg,
            kp,
            Q_bh,
            DO_bh,
            LSE_bh,
            DELTA_bh,
            QSEG_b,
            RB_h,
            b_lo,
            b_hi,
            slope,
            BIAS_bh,
            offs_d,
            p_lo,
            p_hi,
            q_off,
            k0,
            qk_scale,
            M,
            N,
            D,
            W,
            sqm,
            sqd,
            sdom,
            sdod,
            sbm,
            sbn,
            sqs,
            MASK,
            BIAS_KIND,
            REL_GRAD,
            HAS_KPM,
            HAS_SEG,
            DOT_PREC,
            BLOCK_M if (NPART == 1 or part != 1) else NEAR_M,
            BLOCK_N,
            WIN if (NPART == 1 or part != 1) else NEAR_WIN,
            RB,
            REL_MODE if NPART == 1 else (3 if (part == 1 and REL_MODE == 3) else 1 - part),
            ALIGNED,
            CIRC,
            ZB,
            FOLD,
        )
    return dk, dv, acc_rel, s_lo, s_hi


@triton.jit
def _dkv_tiles(
    dk,
    dv,
    acc_rel,
    s_lo,
    s_hi,
    k,
    v,
    kpos,
    kseg,
    kp,
    Q_bh,
    DO_bh,
    LSE_bh,
    DELTA_bh,
    QSEG_b,
    RB_h,
    b_lo,
    b_hi,
    slope,
    BIAS_bh,
    offs_d,
    start,
    end,
    q_off,
    k0,
    qk_scale,
    M,
    N,
    D,
    W,
    sqm,
    sqd,
    sdom,
    sdod,
    sbm,
    sbn,
    sqs,
    MASK: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    REL_GRAD: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WIN: tl.constexpr,
    RB: tl.constexpr,
    REL_MODE: tl.constexpr,
    ALIGNED: tl.constexpr,
    CIRC: tl.constexpr = 0,
    ZB: tl.constexpr = 8,
    FOLD: tl.constexpr = False,
):
    # the bias gradient's clamped ends, per key row (far tiles) and per diagonal (near tiles): reduced to the
    # scalars s_lo / s_hi once, after the loop
    v_lo = tl.zeros([BLOCK_N], tl.float32)
    v_hi = tl.zeros([BLOCK_N], tl.float32)
    w_lo = tl.zeros([WIN], tl.float32)
    w_hi = tl.zeros([WIN], tl.float32)
    # near steps with CIRC 2 or 3: their sums stay per thread until the loop ends
    DEFER: tl.constexpr = REL_GRAD and CIRC >= 2 and REL_MODE == 3
    # tiles whose bias is one constant c (T5, wholly beyond +-W): P = exp2(s - (lse - c)), one FFMA per element
    # (FOLD_SCALE)
    CONST: tl.constexpr = FOLD and BIAS_KIND == 1 and (REL_MODE == 1 or REL_MODE == -1)
    if DEFER:
        acc_b = tl.zeros([BLOCK_N, ZB, 4 if BLOCK_M >= 4 else BLOCK_M], tl.float32)
    if REL_MODE == 3 and PREFETCH:  # as _dq_tiles, along the queries
        next_bias = _near_bias(RB_h, (q_off + start + tl.arange(0, BLOCK_M))[None, :], kpos[:, None], k0, W)
    for start_m in range(start, end, BLOCK_M):
        if ALIGNED:  # the document pass starts at its document's first query
            start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qpos = q_off + offs_m
        if REL_MODE == 3 and PREFETCH:
            bias = next_bias
            next_bias = _near_bias(RB_h, qpos[None, :] + BLOCK_M, kpos[:, None], k0, W)
        mmask = (offs_m[:, None] < M) & (offs_d[None, :] < D)
        q = tl.load(Q_bh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=mmask, other=0.0)
        do = tl.load(DO_bh + offs_m[:, None] * sdom + offs_d[None, :] * sdod, mask=mmask, other=0.0)
        # padded query rows get lse=+inf, hence P=0 and no contribution
        lse = tl.load(LSE_bh + offs_m, mask=offs_m < M, other=float("inf"))
        delta = tl.load(DELTA_bh + offs_m, mask=offs_m < M, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        qp0 = q_off + start_m
        rel_lo = k0 - (qp0 + BLOCK_M - 1)
        rel_hi = k0 + BLOCK_N - 1 - qp0
        if REL_MODE == 3 and PREFETCH:
            sT += bias
        if CONST:
            lse = lse - (b_lo if REL_MODE == -1 else b_hi)
        else:
            sT = _add_bias(
                sT,
                BIAS_KIND,
                RB_h,
                b_lo,
                b_hi,
                slope,
                BIAS_bh + offs_m[None, :] * sbm + kpos[:, None] * sbn,
                (offs_m[None, :] < M) & (kpos[:, None] < N),
                rel_lo,
                rel_hi,
                kpos[:, None],
                qpos[None, :],
                k0,
                W,
                BLOCK_N,
                BLOCK_M,
                4 if (REL_MODE == 3 and PREFETCH) else REL_MODE,
            )
        if MASK:
            sT = tl.where(kpos[:, None] <= qpos[None, :], sT, float("-inf"))
        if HAS_KPM:
            sT = tl.where(kp[:, None] != 0, sT, float("-inf"))
        if HAS_SEG:
            qs = tl.load(QSEG_b + offs_m * sqs, mask=offs_m < M, other=-2)
            sT = tl.where(kseg[:, None] == qs[None, :], sT, float("-inf"))
        pT = tl.math.exp2(sT - lse[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
        if REL_GRAD:
            if REL_MODE != 1 and REL_MODE != -1:  # far tiles' row sums are masked once, after the loop
                dsT = tl.where(kpos[:, None] < N, dsT, 0.0)  # key rows past N hold garbage scores
            if DEFER:
                acc_b = _rel_grad_defer(dsT, acc_b, k0, qp0, BLOCK_M, BLOCK_N, ZB, CIRC == 3)
            else:
                acc_rel, v_lo, v_hi, w_lo, w_hi = _rel_grad(
                    dsT,
                    acc_rel,
                    v_lo,
                    v_hi,
                    w_lo,
                    w_hi,
                    rel_lo,
                    rel_hi,
                    k0 - qp0,
                    W,
                    BLOCK_M,
                    BLOCK_N,
                    WIN,
                    RB,
                    REL_MODE,
                    CIRC != 0,  # 2: the masked and per-tile steps skew circularly per step
                )
    if DEFER:
        acc_rel, s_lo, s_hi = _rel_defer_ends(acc_b, acc_rel, s_lo, s_hi, W, BLOCK_N, ZB, RB)
    if REL_GRAD:
        s_lo += tl.sum(tl.where(kpos < N, v_lo, 0.0), 0) + tl.sum(w_lo, 0)
        s_hi += tl.sum(tl.where(kpos < N, v_hi, 0.0), 0) + tl.sum(w_hi, 0)
    return dk, dv, acc_rel, s_lo, s_hi


@triton.autotune(
    configs=_DKV_CONFIGS,
    # the table gradient and its skew change the kernel's registers, so they are tuned apart
    key=[
        *_TUNE_KEY,
        "REL_GRAD",
        "CIRC",
        "NEAR_DKV",
        "FOLD",
        "M_BUCKET",
        "N_BUCKET",
    ],
    prune_configs_by={"early_config_prune": _prune_by_smem},
)
@triton.heuristics(
    {
        "WIN": lambda a: next_pow2(a["BLOCK_M"] + a["BLOCK_N"] - 1),
        # near-diagonal steps: 16 queries for "split", NEAR["dkv"] (passed as NEAR_DKV, so that it keys the
        # tuning) for "table" (as in _fwd_kernel)
        "NEAR_M": lambda a: min(a["BLOCK_M"], a["NEAR_DKV"] if a["NEAR_TABLE"] else 16),
        "NEAR_WIN": lambda a: next_pow2(
            min(a["BLOCK_M"], a["NEAR_DKV"] if a["NEAR_TABLE"] else 16) + a["BLOCK_N"] - 1
        ),
        # bins of the deferred near sums (CIRC 2 and 3): the near range is cut on the BLOCK_M grid, so a near step's
        # distances lie within +-(W + BLOCK_N + BLOCK_M - 3), and W < RB / 2: ZB / 2 blocks of BLOCK_N distances
        # on each side hold them
        "ZB": lambda a: next_pow2(2 * cdiv(a["RB"] // 2 + a["BLOCK_N"] + a["BLOCK_M"] - 2, a["BLOCK_N"])),
    }
)
@triton.jit
def _dkv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    RBV,
    DREL,
    BIAS,
    KPM,
    QSEG,
    KSEG,
    QLO,
    QHI,
    DLO,
    DHI,
    QOFF,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sdob,
    sdoh,
    sdom,
    sdod,
    sdkb,
    sdkh,
    sdkn,
    sdkd,
    sdvb,
    sdvh,
    sdvn,
    sdvd,
    sbb,
    sbh,
    sbm,
    sbn,
    skpb,
    skp,
    sqsb,
    sqs,
    sksb,
    sks,
    sdrel,
    H,
    M,
    N,
    D,
    NGK,
    NKB,
    q_off_int,
    qk_scale,
    scale,
    W,
    M_BUCKET,
    N_BUCKET,
    BIAS_KIND: tl.constexpr,
    REL_GRAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    SEG_PASS: tl.constexpr,
    SEG_MAXB: tl.constexpr,
    QOFF_FROM_PTR: tl.constexpr,
    DOT_PREC: tl.constexpr,
    NPART: tl.constexpr,
    NEAR_TABLE: tl.constexpr,
    RBW: tl.constexpr,
    RB: tl.constexpr,
    DREL_BN: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WIN: tl.constexpr,
    NEAR_M: tl.constexpr,
    NEAR_WIN: tl.constexpr,
    CIRC: tl.constexpr,
    NEAR_DKV: tl.constexpr,
    ZB: tl.constexpr,
    FOLD: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    k0 = pid_n * BLOCK_N
    kpos = k0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_off = _q_offset(QOFF, q_off_int, QOFF_FROM_PTR)
    kmask = (kpos[:, None] < N) & (offs_d[None, :] < D)
    k = tl.load(K + b * skb + h * skh + kpos[:, None] * skn + offs_d[None, :] * skd, mask=kmask, other=0.0)
    v = tl.load(V + b * svb + h * svh + kpos[:, None] * svn + offs_d[None, :] * svd, mask=kmask, other=0.0)

    lo = 0
    hi = M
    m_end = M  # queries past it are masked (lse = +inf)
    if CAUSAL:  # query i sees key j iff q_off + i >= j
        lo = tl.maximum(k0 - q_off, 0)
    kseg = kpos
    if (
        SEG_PASS == 1
    ):  # document pass, as in the forward: keys of one document, whose queries are [d_lo, d_hi)
        d_lo, d_hi, one = _doc_block(DLO + b * NGK, DHI + b * NGK, k0 // 16, NGK, BLOCK_N // 16)
        if not one:
            return
        lo = tl.maximum(lo, d_lo)
        hi = tl.minimum(hi, d_hi)
        m_end = d_hi
    if HAS_SEG:
        if SEG_PASS == 2:
            _, _, one = _doc_block(
                DLO + b * NGK, DHI + b * NGK, k0 // SEG_MAXB * (SEG_MAXB // 16), NGK, SEG_MAXB // 16
            )
            if one:
                return
        kseg = tl.load(KSEG + b * sksb + kpos * sks, mask=kpos < N, other=-3)
        lo_seg, hi_seg = _group_span(QLO + b * NGK, QHI + b * NGK, k0 // 16, NGK, M, BLOCK_N // 16)
        lo = tl.maximum(lo, lo_seg)
        hi = tl.minimum(hi, hi_seg)
    if SEG_PASS != 1:
        lo = tl.minimum(lo, M) // BLOCK_M * BLOCK_M
    # [lo, mid): query tiles crossing the causal diagonal; [mid, hi): fully visible
    mid = lo
    if CAUSAL:
        mid = lo + (tl.maximum(k0 + BLOCK_N - 1 - q_off - lo, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        mid = tl.minimum(mid, tl.maximum(hi, lo))
    kp = kpos
    if HAS_KPM:
        kp = tl.load(KPM + b * skpb + kpos * skp, mask=kpos < N, other=0)
    RB_h = RBV
    b_lo = 0.0
    b_hi = 0.0
    slope = 0.0
    if BIAS_KIND == 1:
        RB_h = RBV + h * RBW
        if NEAR_TABLE:  # the Toeplitz table comes first in each head's row (see _rel_index)
            RB_h += (2 * W + 4 * NT_COLS) * NT_COLS
        b_lo = tl.load(RB_h).to(tl.float32)
        b_hi = tl.load(RB_h + 2 * W).to(tl.float32)
    if BIAS_KIND == 2:
        slope = tl.load(RBV + h)
    BIAS_bh = BIAS
    if BIAS_KIND == 3:
        BIAS_bh = BIAS + b * sbb + h * sbh
    QSEG_b = QSEG
    if HAS_SEG:
        QSEG_b = QSEG + b * sqsb
    bh_m = pid_bh.to(tl.int64) * M
    Q_bh = Q + b * sqb + h * sqh
    DO_bh = DO + b * sdob + h * sdoh

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    acc_rel = tl.zeros((RB,), tl.float32)
    s_lo = tl.zeros((1,), tl.float32)
    s_hi = tl.zeros((1,), tl.float32)
    dk, dv, acc_rel, s_lo, s_hi = _dkv_inner(
        dk,
        dv,
        acc_rel,
        s_lo,
        s_hi,
        k,
        v,
        kpos,
        kseg,
        kp,
        Q_bh,
        DO_bh,
        LSE + bh_m,
        DELTA + bh_m,
        QSEG_b,
        RB_h,
        b_lo,
        b_hi,
        slope,
        BIAS_bh,
        offs_d,
        lo,
        mid,
        q_off,
        k0,
        qk_scale,
        m_end,
        N,
        D,
        W,
        sqm,
        sqd,
        sdom,
        sdod,
        sbm,
        sbn,
        sqs,
        True,
        BIAS_KIND,
        REL_GRAD,
        HAS_KPM,
        HAS_SEG,
        DOT_PREC,
        NEAR_M if NPART == 3 else BLOCK_M,
        BLOCK_N,
        NEAR_WIN if NPART == 3 else WIN,
        RB,
        1,
        2,  # per tile (branching); only the masked last tiles run here
        NEAR_M,
        NEAR_WIN,
        SEG_PASS != 1,
        CIRC,
        ZB,
        FOLD,
    )
    dk, dv, acc_rel, s_lo, s_hi = _dkv_inner(
        dk,
        dv,
        acc_rel,
        s_lo,
        s_hi,
        k,
        v,
        kpos,
        kseg,
        kp,
        Q_bh,
        DO_bh,
        LSE + bh_m,
        DELTA + bh_m,
        QSEG_b,
        RB_h,
        b_lo,
        b_hi,
        slope,
        BIAS_bh,
        offs_d,
        mid,
        hi,
        q_off,
        k0,
        qk_scale,
        m_end,
        N,
        D,
        W,
        sqm,
        sqd,
        sdom,
        sdod,
        sbm,
        sbn,
        sqs,
        False,
        BIAS_KIND,
        REL_GRAD,
        HAS_KPM,
        HAS_SEG,
        DOT_PREC,
        BLOCK_M,
        BLOCK_N,
        WIN,
        RB,
        NPART,
        3 if NEAR_TABLE else 2,
        NEAR_M,
        NEAR_WIN,
        SEG_PASS != 1,
        CIRC,
        ZB,
        FOLD,
    )
    dk = dk * scale
    tl.store(
        DK + b * sdkb + h * sdkh + kpos[:, None] * sdkn + offs_d[None, :] * sdkd,
        dk.to(DK.dtype.element_ty),
        mask=kmask,
    )
    tl.store(
        DV + b * sdvb + h * sdvh + kpos[:, None] * sdvn + offs_d[None, :] * sdvd,
        dv.to(DV.dtype.element_ty),
        mask=kmask,
    )
    if REL_GRAD:  # one row per program: reduced afterwards in a fixed order (deterministic)
        r = tl.arange(0, RB)
        acc_rel += tl.where(r == 0, s_lo, 0.0) + tl.where(r == 2 * W, s_hi, 0.0)
        # rows ordered (batch, key block, head), so the host's sum over batch and key blocks is one reduction
        # over the leading dim of a contiguous (B * NKB, H * sdrel) buffer; a program of RPB rows' worth of keys
        # writes its sums to the first and zeros to the others
        RPB: tl.constexpr = BLOCK_N // DREL_BN
        DREL_p = DREL + ((b * NKB + pid_n * RPB) * H + h) * sdrel
        tl.store(DREL_p + r, acc_rel, mask=r < sdrel)
        for i in tl.static_range(1, RPB):
            ok = (r < sdrel) & (pid_n * RPB + i < NKB)
            tl.store(DREL_p + i * H * sdrel + r, tl.zeros((RB,), tl.float32), mask=ok)


@triton.jit
def _dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    qpos,
    qseg,
    K_bh,
    V_bh,
    KPM_b,
    KSEG_b,
    BIAS_bh,
    DB_bh,
    RB_h,
    b_lo,
    b_hi,
    slope,
    offs_m,
    offs_d,
    start,
    end,
    qp0,
    qk_scale,
    M,
    N,
    D,
    W,
    skn,
    skd,
    svn,
    svd,
    sbm,
    sbn,
    sdbm,
    skp,
    sks,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NPART: tl.constexpr,
    REL_MODE: tl.constexpr,
    NEAR_N: tl.constexpr,
    ALIGNED: tl.constexpr,
    FOLD: tl.constexpr = False,
):
    # as _fwd_inner
    e1 = start
    e2 = end
    if NPART == 3:
        e1, e2 = _split_bounds(start, end, qp0 - W - BLOCK_N + 2, qp0 + BLOCK_M - 1 + W, BLOCK_N)
    for part in tl.static_range(NPART):
        p_lo = start if part == 0 else (e1 if part == 1 else e2)
        p_hi = end if part == NPART - 1 else (e1 if part == 0 else e2)
        dq = _dq_tiles(
            dq,
            q,
            do,
            lse,
            delta,
            qpos,
            qseg,
            K_bh,
            V_bh,
            KPM_b,
            KSEG_b,
            BIAS_bh,
            DB_bh,
            RB_h,
            b_lo,
            b_hi,
            slope,
            offs_m,
            offs_d,
            p_lo,
            p_hi,
            qp0,
            qk_scale,
            M,
            N,
            D,
            W,
            skn,
            skd,
            svn,
            svd,
            sbm,
            sbn,
            sdbm,
            skp,
            sks,
            MASK,
            CAUSAL,
            BIAS_KIND,
            BIAS_GRAD,
            HAS_KPM,
            HAS_SEG,
            DOT_PREC,
            BLOCK_M,
            BLOCK_N if (NPART == 1 or part != 1) else NEAR_N,
            REL_MODE if NPART == 1 else (3 if (part == 1 and REL_MODE == 3) else part - 1),
            ALIGNED,
            FOLD,
        )
    return dq


@triton.jit
def _dq_tiles(
    dq,
    q,
    do,
    lse,
    delta,
    qpos,
    qseg,
    K_bh,
    V_bh,
    KPM_b,
    KSEG_b,
    BIAS_bh,
    DB_bh,
    RB_h,
    b_lo,
    b_hi,
    slope,
    offs_m,
    offs_d,
    start,
    end,
    qp0,
    qk_scale,
    M,
    N,
    D,
    W,
    skn,
    skd,
    svn,
    svd,
    sbm,
    sbn,
    sdbm,
    skp,
    sks,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    REL_MODE: tl.constexpr,
    ALIGNED: tl.constexpr,
    FOLD: tl.constexpr = False,
):
    # tiles whose bias is one constant c (T5, wholly beyond +-W): P = exp2(s - (lse - c)) (FOLD_SCALE, as _dkv_tiles)
    CONST: tl.constexpr = FOLD and BIAS_KIND == 1 and (REL_MODE == 1 or REL_MODE == -1)
    lse_c = lse
    if CONST:
        lse_c = lse - (b_lo if REL_MODE == -1 else b_hi)
    if REL_MODE == 3 and PREFETCH:  # step i + 1's bias tile is loaded before step i's dots (see PREFETCH)
        next_bias = _near_bias(RB_h, qpos[:, None], start + tl.arange(0, BLOCK_N)[None, :], start, W)
    for start_n in range(start, end, BLOCK_N):
        if ALIGNED:  # the document pass starts at its document's first key
            start_n = tl.multiple_of(start_n, BLOCK_N)
        kpos = start_n + tl.arange(0, BLOCK_N)
        if REL_MODE == 3 and PREFETCH:
            bias = next_bias
            next_bias = _near_bias(RB_h, qpos[:, None], kpos[None, :] + BLOCK_N, start_n + BLOCK_N, W)
        kmask = (kpos[:, None] < N) & (offs_d[None, :] < D)
        k = tl.load(K_bh + kpos[:, None] * skn + offs_d[None, :] * skd, mask=kmask, other=0.0)
        v = tl.load(V_bh + kpos[:, None] * svn + offs_d[None, :] * svd, mask=kmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        rel_lo = start_n - (qp0 + BLOCK_M - 1)
        rel_hi = start_n + BLOCK_N - 1 - qp0
        tile_mask = (offs_m[:, None] < M) & (kpos[None, :] < N)
        if REL_MODE == 3 and PREFETCH:
            s += bias
        if not CONST:
            s = _add_bias(
                s,
                BIAS_KIND,
                RB_h,
                b_lo,
                b_hi,
                slope,
                BIAS_bh + offs_m[:, None] * sbm + kpos[None, :] * sbn,
                tile_mask,
                rel_lo,
                rel_hi,
                kpos[None, :],
                qpos[:, None],
                start_n,
                W,
                BLOCK_M,
                BLOCK_N,
                4 if (REL_MODE == 3 and PREFETCH) else REL_MODE,
            )
        if MASK:
            keep = kpos[None, :] < N
            if CAUSAL:
                keep = keep & (kpos[None, :] <= qpos[:, None])
            s = tl.where(keep, s, float("-inf"))
        if HAS_KPM:
            kp = tl.load(KPM_b + kpos * skp, mask=kpos < N, other=0)
            s = tl.where(kp[None, :] != 0, s, float("-inf"))
        if HAS_SEG:
            ks = tl.load(KSEG_b + kpos * sks, mask=kpos < N, other=-3)
            s = tl.where(qseg[:, None] == ks[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse_c[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD:
            tl.store(DB_bh + offs_m[:, None] * sdbm + kpos[None, :], ds, mask=tile_mask)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.autotune(
    configs=_DQ_CONFIGS,
    key=[
        *_TUNE_KEY,
        "FOLD",
        "TAIL",
        "M_BUCKET",
        "N_BUCKET",
    ],
    prune_configs_by={"early_config_prune": _prune_by_smem},
)
@triton.heuristics({"NEAR_N": lambda a: min(a["BLOCK_N"], NEAR["dq"] if a["NEAR_TABLE"] else 16)})  # as fwd
@triton.jit
def _dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    RBV,
    BIAS,
    DB,
    KPM,
    QSEG,
    KSEG,
    KVLO,
    KVHI,
    DLO,
    DHI,
    QOFF,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sdob,
    sdoh,
    sdom,
    sdod,
    sdqb,
    sdqh,
    sdqm,
    sdqd,
    sbb,
    sbh,
    sbm,
    sbn,
    skpb,
    skp,
    sqsb,
    sqs,
    sksb,
    sks,
    H,
    M,
    N,
    D,
    NGQ,
    q_off_int,
    qk_scale,
    scale,
    W,
    M_BUCKET,
    N_BUCKET,
    BIAS_KIND: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    SEG_PASS: tl.constexpr,
    SEG_MAXB: tl.constexpr,
    QOFF_FROM_PTR: tl.constexpr,
    DOT_PREC: tl.constexpr,
    NPART: tl.constexpr,
    NEAR_TABLE: tl.constexpr,
    RBW: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NEAR_N: tl.constexpr,
    FOLD: tl.constexpr = False,
    TAIL: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_off = _q_offset(QOFF, q_off_int, QOFF_FROM_PTR)
    qpos = q_off + offs_m
    qmask = (offs_m[:, None] < M) & (offs_d[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=qmask, other=0.0)
    do = tl.load(
        DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod, mask=qmask, other=0.0
    )
    bh_m = pid_bh.to(tl.int64) * M
    lse = tl.load(LSE + bh_m + offs_m, mask=offs_m < M, other=float("inf"))
    delta = tl.load(DELTA + bh_m + offs_m, mask=offs_m < M, other=0.0)

    lo = 0
    hi = N
    n_end = N  # keys past it are masked in the last tiles
    if CAUSAL:
        hi = tl.minimum(hi, q_off + m0 + BLOCK_M)
    qseg = offs_m
    if SEG_PASS == 1:  # document pass, as in the forward
        d_lo, d_hi, one = _doc_block(DLO + b * NGQ, DHI + b * NGQ, m0 // 16, NGQ, BLOCK_M // 16)
        if not one:
            return
        lo = d_lo
        hi = tl.minimum(hi, d_hi)
        n_end = d_hi
    if HAS_SEG:
        if SEG_PASS == 2:
            _, _, one = _doc_block(
                DLO + b * NGQ, DHI + b * NGQ, m0 // SEG_MAXB * (SEG_MAXB // 16), NGQ, SEG_MAXB // 16
            )
            if one:
                return
        qseg = tl.load(QSEG + b * sqsb + offs_m * sqs, mask=offs_m < M, other=-2)
        lo, hi_seg = _group_span(KVLO + b * NGQ, KVHI + b * NGQ, m0 // 16, NGQ, N, BLOCK_M // 16)
        hi = tl.minimum(hi, hi_seg)
    if SEG_PASS != 1:
        lo = tl.maximum(lo, 0) // BLOCK_N * BLOCK_N
    full_end = hi
    if CAUSAL:
        full_end = tl.minimum(hi, q_off + m0 + 1)
    mid = lo + tl.maximum(full_end - lo, 0) // BLOCK_N * BLOCK_N

    RB_h = RBV
    b_lo = 0.0
    b_hi = 0.0
    slope = 0.0
    if BIAS_KIND == 1:
        RB_h = RBV + h * RBW
        if NEAR_TABLE:  # the Toeplitz table comes first in each head's row (see _rel_index)
            RB_h += (2 * W + 4 * NT_COLS) * NT_COLS
        b_lo = tl.load(RB_h).to(tl.float32)
        b_hi = tl.load(RB_h + 2 * W).to(tl.float32)
    if BIAS_KIND == 2:
        slope = tl.load(RBV + h)
    BIAS_bh = BIAS
    if BIAS_KIND == 3:
        BIAS_bh = BIAS + b * sbb + h * sbh
    DB_bh = DB
    if BIAS_GRAD:
        DB_bh = DB + pid_bh.to(tl.int64) * M * N
    KPM_b = KPM
    if HAS_KPM:
        KPM_b = KPM + b * skpb
    KSEG_b = KSEG
    if HAS_SEG:
        KSEG_b = KSEG + b * sksb
    K_bh = K + b * skb + h * skh
    V_bh = V + b * svb + h * svh
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dq = _dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        qpos,
        qseg,
        K_bh,
        V_bh,
        KPM_b,
        KSEG_b,
        BIAS_bh,
        DB_bh,
        RB_h,
        b_lo,
        b_hi,
        slope,
        offs_m,
        offs_d,
        lo,
        mid,
        q_off + m0,
        qk_scale,
        M,
        N,
        D,
        W,
        skn,
        skd,
        svn,
        svd,
        sbm,
        sbn,
        N,
        skp,
        sks,
        False,
        CAUSAL,
        BIAS_KIND,
        BIAS_GRAD,
        HAS_KPM,
        HAS_SEG,
        DOT_PREC,
        BLOCK_M,
        BLOCK_N,
        NPART,
        3 if NEAR_TABLE else 2,
        NEAR_N,
        SEG_PASS != 1,
        FOLD,
    )
    dq = _dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        qpos,
        qseg,
        K_bh,
        V_bh,
        KPM_b,
        KSEG_b,
        BIAS_bh,
        DB_bh,
        RB_h,
        b_lo,
        b_hi,
        slope,
        offs_m,
        offs_d,
        mid,
        hi,
        q_off + m0,
        qk_scale,
        M,
        n_end,
        D,
        W,
        skn,
        skd,
        svn,
        svd,
        sbm,
        sbn,
        N,
        skp,
        sks,
        True,
        CAUSAL,
        BIAS_KIND,
        BIAS_GRAD,
        HAS_KPM,
        HAS_SEG,
        DOT_PREC,
        BLOCK_M,
        NEAR_N if NPART == 3 else BLOCK_N,
        1,
        (3 if TAIL else 0) if NPART == 3 else 2,  # as the forward's (TAIL_TABLE)
        NEAR_N,
        SEG_PASS != 1,
        FOLD,
    )
    dq = dq * scale
    tl.store(
        DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
        dq.to(DQ.dtype.element_ty),
        mask=qmask,
    )


# --------------------------------------------------------------------------------------------- host side
# launched through ``Launcher`` (ops/launch.py): Triton's per-launch Python work is done once per specialisation;
# the heuristics read the NEAR step widths, so those join the key
_near_key = lambda: tuple(NEAR.values())  # noqa: E731
_FWD, _DKV, _DQ = (Launcher(k, extra=_near_key) for k in (_fwd_kernel, _dkv_kernel, _dq_kernel))
_DELTA = Launcher(_delta_kernel)


def _pow2(x: int) -> int:
    return next_pow2(max(int(x), 1))


def _outside_graph_pools(fn):
    """For the cached device tensors below: on CUDA, build them in a helper thread that waits for its stream.

    While torch.compile(mode="reduce-overhead") warms a CUDA graph up, it sends every allocation of the calling
    thread to the graph's private memory pool, and a tensor that stays alive there after the step (as a cache
    entry does) fails the graph's check that all live allocations are its outputs. Another thread allocates
    from the ordinary pool. During a capture itself nothing new is cached: see ``_DeviceConstants``."""

    @functools.wraps(fn)
    def build(*args):
        dev = next(
            a if isinstance(a, torch.device) else a.device
            for a in args
            if isinstance(a, (torch.device, torch.Tensor))
        )
        if dev.type != "cuda":
            return fn(*args)

        def run():
            with torch.cuda.device(dev):
                out = fn(*args)
                torch.cuda.current_stream(dev).synchronize()
            return out

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(run).result()

    return build


class _DeviceConstants:
    """Memoises a builder of constant device tensors (bucket ids, index maps, a placeholder), keyed by its
    arguments. Entries are built outside any CUDA graph's memory pool (``_outside_graph_pools``). While a
    graph is being captured, an entry built before is used as it is: it is constant and lives outside the
    graph, so the graph only reads it (a captured step replays none of the ~25 small kernels that build it).
    A missing entry is then built without caching: a tensor made during capture must not outlive its graph.
    Warm-up steps run eagerly before any capture, so a captured step normally finds every entry."""

    def __init__(self, fn):
        self.fn = fn
        self.build = _outside_graph_pools(fn)
        self.entries: dict = {}
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        hit = self.entries.get(args)
        if hit is not None:
            return hit
        dev = next(
            a if isinstance(a, torch.device) else a.device
            for a in args
            if isinstance(a, (torch.device, torch.Tensor))
        )
        if _capturing(dev):
            return self.fn(*args)
        out = self.entries[args] = self.build(*args)
        return out

    def cache_clear(self) -> None:
        self.entries.clear()


@functools.cache
def _saturation_width(nb: int, bidirectional: bool, max_distance: int) -> int:
    """W: the bucket of every distance d >= W equals that of W, and of every d <= -W that of -W.

    Bucketing saturates at max_distance (and every bucket id is < nb), but in practice sooner: with 32
    bidirectional buckets and max distance 128 the last log bucket already starts at |d| = 91 (113 for 32
    causal buckets). Every distance the kernels treat as "near" costs a gathered bias and a skewed gradient,
    so W is the exact saturation point, found by the reference bucketing on the host, plus one distance of
    margin: a log rounded differently on another device may move a bucket boundary by one, never more."""
    w_max = max(int(max_distance), nb)
    # real CPU tensors even when first called from a fake-tensor trace (torch.compile's shape propagation)
    with unset_fake_temporarily():
        d = torch.arange(-w_max, w_max + 1, device="cpu")
        b = relative_position_bucket(d, bidirectional, nb, max_distance).tolist()
    lo, hi = b[0], b[-1]
    w = w_max
    while w > 1 and b[w_max + w - 1] == hi and b[w_max - (w - 1)] == lo:
        w -= 1
    return min(w + 1, w_max)


@_DeviceConstants
def _distance_buckets(nb: int, bidirectional: bool, max_distance: int, device: torch.device):
    """Buckets of the distances -W..W (W = ``_saturation_width``), and per bucket the span [lo, hi) of distance
    indices (0..2W) from its first to one past its last distance (lo = hi = 0 for a bucket no distance falls
    in). Device ops only."""
    w = _saturation_width(nb, bool(bidirectional), int(max_distance))
    dist = torch.arange(-w, w + 1, device=device)
    buckets = relative_position_bucket(dist, bidirectional, nb, max_distance)  # (2W+1,)
    hit = torch.nn.functional.one_hot(buckets, nb).to(torch.uint8)  # (2W+1, nb)
    present = hit.any(0).bool()
    lo = torch.where(present, hit.argmax(0), 0).to(torch.int32)
    hi = torch.where(present, 2 * w + 1 - hit.flip(0).argmax(0), 0).to(torch.int32)
    return buckets, lo, hi


@_DeviceConstants
def _dummy_cached(device: torch.device) -> torch.Tensor:
    return torch.empty(1, device=device, dtype=torch.float32)


def _capturing(dev: torch.device) -> bool:
    return dev.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _dummy(dev: torch.device) -> torch.Tensor:
    """Placeholder pointer for absent kernel arguments (never read or written): one per device."""
    return _dummy_cached(dev)


def _nt_rows(w: int) -> int:
    """Rows of the Toeplitz table: row q - ref + W + 2K (K = NT_COLS) for a query q of a near tile whose first
    key is ref. The forward reads a near step's rows as one block (``_fwd_tiles``, TMA: nothing clamps them),
    so all of them must lie in the table. Its near steps (``_fwd_inner``) run from e1 to e2 in steps of NEAR_N,
    where e1 (e2) is the first key-block start >= qp0 - W - BLOCK_N + 2 (>= qp0 + BLOCK_M - 1 + W), qp0 the
    block's first query position, and e2 - e1 is a multiple of BLOCK_N, hence of NEAR_N (clamping both to the
    loop's end keeps that). So every step start s has qp0 - W - BLOCK_N + 2 <= s
    <= qp0 + BLOCK_M - 1 + W + BLOCK_N - 1 - NEAR_N, and its rows qp0 + i - s + W + 2K (0 <= i < BLOCK_M) span
    [2K + NEAR_N + 2 - BLOCK_M - BLOCK_N, 2K + 2W + BLOCK_M + BLOCK_N - 3]: within [0, 2W + 4K) for blocks of
    at most K and any NEAR_N >= 1 (tests/ops/test_attention_triton.py checks the bounds, on every forward
    config). The lowest rows only serve steps wholly beyond +W, the highest only steps wholly below -W; the
    first K rows are read only when NEAR_N < BLOCK_M + BLOCK_N - K - 2 (128x128 with steps of 32 or 64 keys,
    128x64 with 32): without them, those steps' rows would start before the table."""
    return 2 * w + 4 * NT_COLS.value


def _rel_width(w: int, table: bool) -> int:
    """Per-head row length of the distance buffer: [Toeplitz table | 2W+1 distances | pad]. With the table the
    row is padded to a multiple of NT_COLS floats, so every head's table starts on a table row of the whole
    buffer: the forward's tensor descriptor sees all heads as one (H * RBW / K, K) matrix."""
    if not table:
        return 2 * w + 1
    return _nt_rows(w) * NT_COLS.value + cdiv(2 * w + 1, NT_COLS.value) * NT_COLS.value


@_DeviceConstants
def _rel_index(buckets: torch.Tensor, w: int) -> torch.Tensor:
    """Bucket of every entry of a "table"-variant head row: table[r, c] holds distance c - r + W + 2 NT_COLS
    (clamped to +-W), then come the distances -W..W, then padding (never read)."""
    dev = buckets.device
    r = torch.arange(_nt_rows(w), device=dev)[:, None]
    c = torch.arange(NT_COLS.value, device=dev)[None, :]
    table = (c - r + w + 2 * NT_COLS.value).clamp(-w, w) + w
    pad = torch.zeros(_rel_width(w, True) - table.numel() - (2 * w + 1), dtype=torch.long, device=dev)
    return buckets[torch.cat([table.reshape(-1), torch.arange(2 * w + 1, device=dev), pad])]


def _rel_setup(rel_table: torch.Tensor, bidirectional: bool, max_distance: int):
    """Buckets of the distances -W..W (W beyond which the bucket no longer changes) by the reference function.

    They depend only on the bucketing parameters, so they are computed once per device (about 15 small
    kernels saved per attention call, in a captured CUDA graph too: ``_DeviceConstants``). Returns W, the
    buckets and each bucket's span of distance indices (used to map the distance gradient to buckets)."""
    nb = rel_table.shape[0]
    w = _saturation_width(nb, bool(bidirectional), int(max_distance))
    dev = rel_table.device
    return (w, *_distance_buckets(nb, bool(bidirectional), int(max_distance), dev))


@triton.jit
def _segment_ranges_kernel(
    OUTER, INNER, LO, HI, sob, sos, sib, sis, L_OUT, L_IN, NG_OUT, NG_IN, BLOCK_G: tl.constexpr
):  # fmt: skip
    """One program per (16-element group of OUTER, batch row): the span [lo, hi) of INNER's 16-groups whose
    segment-id range [min, max] overlaps this group's; lo = L_IN, hi = 0 when none does."""
    g = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    big = 2**62
    rows = g * 16 + tl.arange(0, 16)
    ids = tl.load(OUTER + b * sob + rows * sos, mask=rows < L_OUT, other=0).to(tl.int64)
    omn = tl.min(tl.where(rows < L_OUT, ids, big), 0)
    omx = tl.max(tl.where(rows < L_OUT, ids, -big), 0)
    first = NG_IN
    last = -1
    for j0 in range(0, NG_IN, BLOCK_G):
        j = j0 + tl.arange(0, BLOCK_G)
        cols = j[:, None] * 16 + tl.arange(0, 16)[None, :]  # (BLOCK_G, 16) elements of INNER
        ok = cols < L_IN
        kid = tl.load(INNER + b * sib + cols * sis, mask=ok, other=0).to(tl.int64)
        imn = tl.min(tl.where(ok, kid, big), 1)
        imx = tl.max(tl.where(ok, kid, -big), 1)
        hit = (omn <= imx) & (omx >= imn) & (j < NG_IN)
        first = tl.minimum(first, tl.min(tl.where(hit, j, NG_IN), 0))
        last = tl.maximum(last, tl.max(tl.where(hit, j, -1), 0))
    anyv = last >= 0
    tl.store(LO + b * NG_OUT + g, tl.where(anyv, first * 16, L_IN).to(tl.int32))
    tl.store(HI + b * NG_OUT + g, tl.where(anyv, tl.minimum((last + 1) * 16, L_IN), 0).to(tl.int32))


@triton.jit
def _doc_ranges_kernel(
    OUTER, INNER, CLO, CHI, DLO, DHI, sob, sos, sib, sis, L_OUT, L_IN, NG_OUT, BLOCK: tl.constexpr
):  # fmt: skip
    """One program per (16-element group of OUTER, batch row): [lo, hi) when every element of the group has one
    segment id whose elements in INNER are exactly lo, lo + 1, ..., hi - 1 (one contiguous, non-empty run),
    else (-1, -1). Scans INNER only over the group's conservative span [CLO, CHI), which holds every element of
    the group's ids."""
    g = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    big = 2**62
    rows = g * 16 + tl.arange(0, 16)
    ids = tl.load(OUTER + b * sob + rows * sos, mask=rows < L_OUT, other=0).to(tl.int64)
    mn = tl.min(tl.where(rows < L_OUT, ids, big), 0)
    mx = tl.max(tl.where(rows < L_OUT, ids, -big), 0)
    lo = tl.load(CLO + b * NG_OUT + g)
    hi = tl.load(CHI + b * NG_OUT + g)
    hi = tl.where(mn == mx, hi, lo)  # a group of several ids: nothing to scan
    first = L_IN
    last = -1
    count = 0
    for j0 in range(lo, hi, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        kid = tl.load(INNER + b * sib + j * sis, mask=j < hi, other=0).to(tl.int64)
        hit = (j < hi) & (kid == mn)
        first = tl.minimum(first, tl.min(tl.where(hit, j, L_IN), 0))
        last = tl.maximum(last, tl.max(tl.where(hit, j, -1), 0))
        count += tl.sum(hit.to(tl.int32), 0)
    one = (mn == mx) & (count > 0) & (count == last - first + 1)
    tl.store(DLO + b * NG_OUT + g, tl.where(one, first, -1).to(tl.int32))
    tl.store(DHI + b * NG_OUT + g, tl.where(one, last + 1, -1).to(tl.int32))


_SEG = Launcher(_segment_ranges_kernel)
_DOC = Launcher(_doc_ranges_kernel)


def _segment_ranges(q_seg: torch.Tensor, kv_seg: torch.Tensor, m: int, n: int):
    """(kv_lo, kv_hi, q_lo, q_hi), each (2, B, groups) int32. [0]: _segment_ranges_ref in two launches of one
    kernel (the reference takes about 60 small torch ops). [1]: per group, the exact range of the other side
    when the group is one document (``_doc_ranges_kernel``), else -1: what the document pass reads."""
    b = q_seg.shape[0]
    ngq, ngk = cdiv(m, SEG_G), cdiv(n, SEG_G)
    new = lambda g: torch.empty((2, b, g), dtype=torch.int32, device=q_seg.device)
    kv_lo, kv_hi, q_lo, q_hi = new(ngq), new(ngq), new(ngk), new(ngk)
    block = min(64, _pow2(ngk)), min(64, _pow2(ngq))
    if b and ngq:
        _SEG[(ngq, b)](
            q_seg, kv_seg, kv_lo, kv_hi, *q_seg.stride(), *kv_seg.stride(), m, n, ngq, ngk, BLOCK_G=block[0]
        )
        _DOC[(ngq, b)](
            q_seg, kv_seg, kv_lo, kv_hi, kv_lo[1], kv_hi[1], *q_seg.stride(), *kv_seg.stride(), m, n, ngq,
            BLOCK=64,
        )  # fmt: skip
    if b and ngk:
        _SEG[(ngk, b)](
            kv_seg, q_seg, q_lo, q_hi, *kv_seg.stride(), *q_seg.stride(), n, m, ngk, ngq, BLOCK_G=block[1]
        )
        _DOC[(ngk, b)](
            kv_seg, q_seg, q_lo, q_hi, q_lo[1], q_hi[1], *kv_seg.stride(), *q_seg.stride(), n, m, ngk,
            BLOCK=64,
        )  # fmt: skip
    return kv_lo, kv_hi, q_lo, q_hi


def _segment_ranges_ref(q_seg: torch.Tensor, kv_seg: torch.Tensor, m: int, n: int):
    """Per 16-row query group: the key range [lo, hi) that can share a segment with it; per 16-column key group
    the same for queries. Device ops only (no sync); conservative, the kernels still mask exactly."""
    b = q_seg.shape[0]
    big = torch.iinfo(torch.int32).max

    def minmax(x, length):
        pad = -length % SEG_G
        x = x.to(torch.int32)
        mn = torch.nn.functional.pad(x, (0, pad), value=big).view(b, -1, SEG_G).amin(-1)
        mx = torch.nn.functional.pad(x, (0, pad), value=-big).view(b, -1, SEG_G).amax(-1)
        return mn, mx

    qmn, qmx = minmax(q_seg, m)
    kmn, kmx = minmax(kv_seg, n)
    overlap = (qmn[:, :, None] <= kmx[:, None, :]) & (qmx[:, :, None] >= kmn[:, None, :])  # (B, Mg, Ng)

    def bounds(ov, length):  # first / one-past-last overlapping group along the last dim, in elements
        ng = ov.shape[-1]
        u8 = ov.to(torch.uint8)
        first = u8.argmax(-1)
        last = ng - 1 - u8.flip(-1).argmax(-1)
        anyv = ov.any(-1)
        lo = torch.where(anyv, first * SEG_G, length)
        hi = torch.where(anyv, torch.clamp((last + 1) * SEG_G, max=length), 0)
        return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()

    kv_lo, kv_hi = bounds(overlap, n)
    q_lo, q_hi = bounds(overlap.transpose(1, 2), m)
    return kv_lo, kv_hi, q_lo, q_hi


@triton.jit
def _rel_vector_kernel(TABLE, IDX, OUT, stb, sth, NIDX, BLOCK: tl.constexpr):
    """OUT[h, j] = TABLE[IDX[j], h] * log2(e) (fp32, rounded to OUT's dtype): a head's bias row, gathered from the
    bucket table."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    h = tl.program_id(1)
    ok = j < NIDX
    bkt = tl.load(IDX + j, mask=ok, other=0)
    val = tl.load(TABLE + bkt * stb + h * sth, mask=ok, other=0.0).to(tl.float32)
    val = val * 1.4426950408889634
    # saturate in fp16: a bias past its range stays huge instead of turning inf
    if OUT.dtype.element_ty == tl.float16:
        val = tl.minimum(tl.maximum(val, -65504.0), 65504.0)
    tl.store(OUT + h * NIDX + j, val.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _table_grad_kernel(
    DREL, BUCKETS, LO, HI, OUT, R, ROW, SROW, H, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
):  # fmt: skip
    """OUT[bucket, h] = the sum, over the R partial rows of DREL (ROW floats apart; head h's distances start at
    h * SROW) and over the distances of that bucket, in one fixed order: a deterministic table gradient."""
    bkt = tl.program_id(0)
    h = tl.program_id(1)
    lo = tl.load(LO + bkt)
    hi = tl.load(HI + bkt)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for d0 in range(lo, hi, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mine = (cols < hi) & (tl.load(BUCKETS + cols, mask=cols < hi, other=-1) == bkt)
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            ptrs = DREL + rows.to(tl.int64)[:, None] * ROW + h * SROW + cols[None, :]
            acc += tl.load(ptrs, mask=(rows < R)[:, None] & mine[None, :], other=0.0)
    tl.store(OUT + bkt * H + h, tl.sum(tl.sum(acc, 1), 0).to(OUT.dtype.element_ty))


_REL_VECTOR, _TABLE_GRAD = Launcher(_rel_vector_kernel), Launcher(_table_grad_kernel)


def _rel_vector(
    rel_table: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(H, len(idx)) in ``dtype``: rel_table[idx].t() * log2(e) (computed in fp32, then rounded), one launch."""
    nb, h = rel_table.shape
    out = torch.empty((h, idx.numel()), dtype=dtype, device=rel_table.device)
    if h and idx.numel():
        _REL_VECTOR[(cdiv(idx.numel(), 1024), h)](
            rel_table, idx, out, rel_table.stride(0), rel_table.stride(1), idx.numel(), BLOCK=1024
        )
    return out


def _table_grad(drel: torch.Tensor, a, rows: int, h: int, srow: int, rel_table: torch.Tensor) -> torch.Tensor:
    """d(rel_table) (num_buckets, H) from the dk/dv kernel's per-(batch, key block) distance sums, one launch."""
    nb = rel_table.shape[0]
    out = torch.empty((nb, h), dtype=rel_table.dtype, device=rel_table.device)
    if nb and h:
        _TABLE_GRAD[(nb, h)](
            drel, a.buckets, a.bucket_lo, a.bucket_hi, out, rows, h * srow, srow, h,
            BLOCK_R=16 if _INTERPRET else 64, BLOCK_D=16 if _INTERPRET else 64,
        )  # fmt: skip
    return out


class _Args:
    """Kernel arguments shared by the forward and backward launches."""

    def __init__(
        self,
        q,
        k,
        scale,
        causal,
        q_offset,
        q_offset_t,
        bias,
        rel_table,
        rel_bidirectional,
        rel_max_distance,
        alibi_slopes,
        key_padding_mask,
        q_segment_ids,
        kv_segment_ids,
        saved=None,
    ):
        self.b, self.h, self.m, self.d = q.shape
        self.n = k.shape[2]
        b, h, m, n = self.b, self.h, self.m, self.n
        dev = q.device
        self.dummy = _dummy(dev)
        self.block_d = max(16, _pow2(self.d))
        self.dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
        self.qk_scale = float(scale) * LOG2E
        self.causal = bool(causal)
        self.qoff_from_ptr = q_offset_t is not None
        self.qoff_ptr = q_offset_t if q_offset_t is not None else self.dummy
        self.q_off_int = int(q_offset)
        self.bias_kind, self.rbv, self.w, self.rbw, self.buckets = BIAS_NONE, self.dummy, 0, 1, None
        self.near_table = False
        self.bias, self.bias_strides = self.dummy, (0, 0, 0, 0)
        if rel_table is not None:
            self.w, self.buckets, self.bucket_lo, self.bucket_hi = _rel_setup(
                rel_table, rel_bidirectional, rel_max_distance
            )
            if saved is not None:
                # the layout is the forward's: the variant may have been switched since
                self.rbv = saved[0]
                self.near_table = self.rbv.shape[1] != 2 * self.w + 1
            else:
                # per head: [Toeplitz table ("table" variant only) | bias per clamped distance -W..W | pad],
                # pre-multiplied by log2(e) for the exp2 softmax; one gather from the bucket table
                self.near_table = _VARIANT == "table"
                idx = self.buckets
                if self.near_table:
                    idx = _rel_index(self.buckets, self.w)
                self.rbv = _rel_vector(rel_table, idx, _rbv_dtype(q.dtype))
            self.bias_kind, self.rbw = BIAS_REL, self.rbv.shape[1]
        elif alibi_slopes is not None:
            self.bias_kind = BIAS_ALIBI
            self.rbv = (-alibi_slopes.float() * LOG2E).contiguous()
        elif bias is not None:
            self.bias_kind = BIAS_TENSOR
            full = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(b, h, m, n)
            self.bias, self.bias_strides = full, full.stride()
        self.rb = _pow2(2 * self.w + 1)
        self.near_table = self.bias_kind == BIAS_REL and self.near_table
        self.npart = 3 if self.bias_kind == BIAS_REL else 1
        self.kpm, self.kpm_strides = self.dummy, (0, 0)
        if key_padding_mask is not None:
            kpm = key_padding_mask
            kpm = kpm.view(torch.uint8) if kpm.dtype == torch.bool else (kpm != 0).view(torch.uint8)
            self.kpm, self.kpm_strides = kpm, kpm.stride()
        self.has_seg = q_segment_ids is not None
        self.qseg, self.kseg, self.qs_strides, self.ks_strides = self.dummy, self.dummy, (0, 0), (0, 0)
        self.kv_lo = self.kv_hi = self.q_lo = self.q_hi = self.dummy
        if self.has_seg:
            self.qseg, self.kseg = q_segment_ids, kv_segment_ids
            self.qs_strides, self.ks_strides = q_segment_ids.stride(), kv_segment_ids.stride()
            if saved is not None:
                self.kv_lo, self.kv_hi, self.q_lo, self.q_hi = saved[1:]
            else:
                self.kv_lo, self.kv_hi, self.q_lo, self.q_hi = _segment_ranges(
                    q_segment_ids, kv_segment_ids, m, n
                )
        self.ngq = cdiv(m, SEG_G)
        self.ngk = cdiv(n, SEG_G)
        self.m_bucket, self.n_bucket = _pow2(m), _pow2(n)

    def saved(self, dev):
        """What the backward reuses instead of recomputing: the T5 distance vector and the segment ranges
        (fresh empty tensors where absent: a custom op's outputs must not alias anything)."""
        none = lambda dtype: torch.empty(0, device=dev, dtype=dtype)
        rbv = self.rbv if self.bias_kind == BIAS_REL else none(torch.float32)
        if self.has_seg:
            return rbv, self.kv_lo, self.kv_hi, self.q_lo, self.q_hi
        return (rbv, *(none(torch.int32) for _ in range(4)))


@functools.cache
def _has_tma(dev: torch.device) -> bool:
    """Whether the forward may read its near bias through a tensor descriptor on ``dev``: TMA needs compute
    capability 9 (Hopper); below it Triton lowers a descriptor to per-element pointers, the cost TMA avoids.
    True off CUDA: there the kernels only run in the interpreter or compile offline for a given target."""
    return dev.type != "cuda" or torch.cuda.get_device_capability(dev)[0] >= 9


def _tma_scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    # Triton launches on the current device and stream, which torch.empty allocates for (the caching
    # allocator's alignment, 512 bytes, exceeds the 128 a descriptor needs)
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _scratch_allocator() -> None:
    """A kernel that builds a tensor descriptor in-kernel writes it to global scratch memory, which Triton's
    launcher requests from the allocator of ``triton.set_allocator`` on every launch. That allocator is a
    context variable, unset (an allocator that raises) in every new thread, autograd's device threads included
    (an activation-checkpointed forward runs there): install one where none is set, never replacing a user's."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_tma_scratch)


def _kv_tma_ok(t: torch.Tensor) -> bool:
    """Whether the forward can read ``t`` (B, H, N, D) through a tensor descriptor per (batch, head): unit stride
    along D, and every other stride and the base address 16-byte aligned (what a TMA descriptor requires)."""
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride()[:-1])


def _seg_passes(a: _Args) -> tuple[int, ...]:
    """Launches of a kernel, by SEG_PASS: 0 alone without segment ids (or with ``DOC_PASS`` off); with them, 1 then
    2. Pass 1 runs the blocks that lie in one document (``_doc_block``) as an unpacked row of that document's
    length: no per-key ids, no masks on the tiles inside it (offline sm_90a, d64, T5 bias, forward 128x64 w8:
    156 registers against 210 with per-key ids; dq 128x64 w8: 136 against 240). Pass 2 runs the other blocks with
    the per-key id masks; a pass-2 program leaves its block to pass 1 only when the whole SEG_MAXB-aligned block
    around it (SEG_MAXB: the kernel's largest block in the swept dimension) is one document, which holds for
    every pass-1 block inside it whatever config each pass's autotuning picked. A block both passes run is
    written twice, pass 2 last; both results are exact."""
    if not a.has_seg:
        return (0,)
    return (1, 2) if DOC_PASS else (0,)


def _max_block(kernel, name: str) -> int:
    """The largest ``name`` among the configs ``kernel``'s autotuner holds now (tests swap them)."""
    return max(c.kwargs[name] for c in kernel.configs)


def _min_block(kernel, name: str) -> int:
    """The smallest ``name`` among the configs ``kernel``'s autotuner holds now (tests swap them)."""
    return min(c.kwargs[name] for c in kernel.configs)


def _forward(q, k, v, a: _Args):
    b, h, m, d, n = a.b, a.h, a.m, a.d, a.n
    out = torch.empty((b, m, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, M, D) view
    lse = torch.empty((b, h, m), dtype=torch.float32, device=q.device)
    if _POISON:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    if m == 0:
        return out, lse
    tma = TMA and a.near_table and _has_tma(q.device)
    kv_tma = KV_TMA and _has_tma(q.device) and _kv_tma_ok(k) and _kv_tma_ok(v)
    if tma or kv_tma:
        _scratch_allocator()
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]), b * h)
    for seg_pass in _seg_passes(a):
        _FWD[grid](
            q,
            k,
            v,
            out,
            lse,
            a.rbv,
            a.bias,
            a.kpm,
            a.qseg,
            a.kseg,
            a.kv_lo,
            a.kv_hi,
            a.kv_lo[1] if a.has_seg else a.dummy,
            a.kv_hi[1] if a.has_seg else a.dummy,
            a.qoff_ptr,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *out.stride(),
            *a.bias_strides,
            *a.kpm_strides,
            *a.qs_strides,
            *a.ks_strides,
            h,
            m,
            n,
            d,
            a.ngq,
            a.q_off_int,
            a.qk_scale,
            a.w,
            a.m_bucket,
            a.n_bucket,
            BIAS_KIND=a.bias_kind,
            CAUSAL=a.causal,
            HAS_KPM=a.kpm is not a.dummy,
            HAS_SEG=a.has_seg and seg_pass != 1,
            SEG_PASS=seg_pass,
            SEG_MAXB=_max_block(_fwd_kernel, "BLOCK_M"),
            QOFF_FROM_PTR=a.qoff_from_ptr,
            DOT_PREC=a.dot_prec,
            NPART=a.npart,
            NEAR_TABLE=a.near_table,
            TMA=tma,
            KV_TMA=kv_tma,
            RBW=a.rbw,
            BLOCK_D=a.block_d,
            POS_SCALE=FOLD_SCALE and a.qk_scale > 0,
            TAIL=TAIL_TABLE and a.near_table and not tma,
        )
    return out, lse


def _grad_buffers(q, k, v):
    """Gradients of the op's q, k, v arguments, and the (B, H, L, D) views of them the kernels write: a packed
    argument gets one contiguous gradient of its own layout (written through strides, no gather afterwards)."""
    dq, dk, dv = (torch.empty_like(t) if t is not None else None for t in (q, k, v))
    views = unpack_qkv(dq, dk, dv)
    # the slot of a None argument gets an empty tensor of its own (a custom op's outputs may not alias)
    return (dq, q.new_empty(0) if dk is None else dk, q.new_empty(0) if dv is None else dv), views


def _backward(do, q, k, v, out, lse, a: _Args, scale, need_drel, need_dbias, rel_table, bias, grads):
    b, h, m, d, n = a.b, a.h, a.m, a.d, a.n
    dev = q.device
    dq, dk, dv = grads
    if _POISON:
        for t in (dq, dk, dv):
            t.fill_(float("nan"))
    delta = torch.empty((b, h, m), dtype=torch.float32, device=dev)
    _DELTA[(cdiv(m, 16 if _INTERPRET else 64), b * h)](
        out,
        do,
        delta,
        *out.stride(),
        *do.stride(),
        h,
        m,
        d,
        BLOCK_M=16 if _INTERPRET else 64,
        BLOCK_D=a.block_d,
    )
    rel_grad = need_drel and a.bias_kind == BIAS_REL
    bn_min = _min_block(_dkv_kernel, "BLOCK_N")
    nkb = cdiv(n, bn_min)
    # one row of 2W+1 distances (padded to 16 bytes) per (batch, key block of bn_min keys, head): a program of
    # BLOCK_N keys writes its BLOCK_N // bn_min rows below nkb (its sums in the first, zeros in the others),
    # so every row is written and the buffer needs no initialisation
    srow = (2 * a.w + 1 + 3) // 4 * 4
    drel = torch.empty((b * h * nkb, srow), dtype=torch.float32, device=dev) if rel_grad else a.dummy
    if _POISON and rel_grad:  # every partial row must be written
        drel.fill_(float("nan"))
    grid_kv = lambda meta: (cdiv(n, meta["BLOCK_N"]), b * h)
    for seg_pass in _seg_passes(a):
        _DKV[grid_kv](
            q,
            k,
            v,
            do,
            dk,
            dv,
            lse,
            delta,
            a.rbv,
            drel,
            a.bias,
            a.kpm,
            a.qseg,
            a.kseg,
            a.q_lo,
            a.q_hi,
            a.q_lo[1] if a.has_seg else a.dummy,
            a.q_hi[1] if a.has_seg else a.dummy,
            a.qoff_ptr,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *do.stride(),
            *dk.stride(),
            *dv.stride(),
            *a.bias_strides,
            *a.kpm_strides,
            *a.qs_strides,
            *a.ks_strides,
            srow,
            h,
            m,
            n,
            d,
            a.ngk,
            nkb,
            a.q_off_int,
            a.qk_scale,
            float(scale),
            a.w,
            a.m_bucket,
            a.n_bucket,
            BIAS_KIND=a.bias_kind,
            REL_GRAD=rel_grad,
            CIRC=_circ_skew() if rel_grad else 0,
            NEAR_DKV=NEAR["dkv"],
            CAUSAL=a.causal,
            HAS_KPM=a.kpm is not a.dummy,
            HAS_SEG=a.has_seg and seg_pass != 1,
            SEG_PASS=seg_pass,
            SEG_MAXB=_max_block(_dkv_kernel, "BLOCK_N"),
            QOFF_FROM_PTR=a.qoff_from_ptr,
            DOT_PREC=a.dot_prec,
            NPART=a.npart,
            NEAR_TABLE=a.near_table,
            RBW=a.rbw,
            RB=a.rb,
            DREL_BN=bn_min,
            BLOCK_D=a.block_d,
            FOLD=FOLD_SCALE,
        )
    bias_grad = need_dbias and a.bias_kind == BIAS_TENSOR
    # skipped (fully masked) tiles are never written: their gradient is zero
    db = torch.zeros((b, h, m, n), dtype=torch.float32, device=dev) if bias_grad else a.dummy
    grid_q = lambda meta: (cdiv(m, meta["BLOCK_M"]), b * h)
    for seg_pass in _seg_passes(a):
        _DQ[grid_q](
            q,
            k,
            v,
            do,
            dq,
            lse,
            delta,
            a.rbv,
            a.bias,
            db,
            a.kpm,
            a.qseg,
            a.kseg,
            a.kv_lo,
            a.kv_hi,
            a.kv_lo[1] if a.has_seg else a.dummy,
            a.kv_hi[1] if a.has_seg else a.dummy,
            a.qoff_ptr,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *do.stride(),
            *dq.stride(),
            *a.bias_strides,
            *a.kpm_strides,
            *a.qs_strides,
            *a.ks_strides,
            h,
            m,
            n,
            d,
            a.ngq,
            a.q_off_int,
            a.qk_scale,
            float(scale),
            a.w,
            a.m_bucket,
            a.n_bucket,
            BIAS_KIND=a.bias_kind,
            BIAS_GRAD=bias_grad,
            CAUSAL=a.causal,
            HAS_KPM=a.kpm is not a.dummy,
            HAS_SEG=a.has_seg and seg_pass != 1,
            SEG_PASS=seg_pass,
            SEG_MAXB=_max_block(_dq_kernel, "BLOCK_M"),
            QOFF_FROM_PTR=a.qoff_from_ptr,
            DOT_PREC=a.dot_prec,
            NPART=a.npart,
            NEAR_TABLE=a.near_table,
            RBW=a.rbw,
            BLOCK_D=a.block_d,
            FOLD=FOLD_SCALE,
            TAIL=TAIL_TABLE and a.near_table,
        )
    d_table = _table_grad(drel, a, b * nkb, h, srow, rel_table) if rel_grad else torch.empty(0, device=dev)
    d_bias = torch.empty(0, device=dev)
    if bias_grad:
        shape4 = (1,) * (4 - bias.dim()) + tuple(bias.shape)
        dims = tuple(i for i in range(4) if shape4[i] == 1 and (b, h, m, n)[i] != 1)
        d_bias = (db.sum(dim=dims, keepdim=True) if dims else db).reshape(bias.shape).to(bias.dtype)
    return d_table, d_bias


# ------------------------------------------------------------------------- torch.library registration
# (through ops/registration.py: custom ops under torch.compile, an autograd.Function in eager mode)
# Optional arguments are spelled out (no **kwargs) so the schema can be inferred; q_offset arrives either as
# an int or as a 0-dim tensor (q_offset_t) that the kernels read on the device.
def _fwd_impl(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    q_offset: int,
    q_offset_t: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    rel_table: Optional[torch.Tensor],
    rel_bidirectional: bool,
    rel_max_distance: int,
    alibi_slopes: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    q_segment_ids: Optional[torch.Tensor],
    kv_segment_ids: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, lse, *saved): saved = (T5 distance vector, kv_lo, kv_hi, q_lo, q_hi) for the backward.
    q, k, v: separate or packed (``unpack_qkv``)."""
    q, k, v = unpack_qkv(q, k, v)
    a = _Args(
        q,
        k,
        scale,
        causal,
        q_offset,
        q_offset_t,
        bias,
        rel_table,
        rel_bidirectional,
        rel_max_distance,
        alibi_slopes,
        key_padding_mask,
        q_segment_ids,
        kv_segment_ids,
    )
    out, lse = _forward(q, k, v, a)
    return (out, lse, *a.saved(q.device))


def _fwd_fake(
    q,
    k,
    v,
    scale,
    causal,
    q_offset,
    q_offset_t,
    bias,
    rel_table,
    rel_bidirectional,
    rel_max_distance,
    alibi_slopes,
    key_padding_mask,
    q_segment_ids,
    kv_segment_ids,
):
    q, k, v = unpack_qkv(q, k, v)
    b, h, m, d = q.shape
    n = k.shape[2]
    out = q.new_empty((b, m, h, d)).transpose(1, 2)
    lse = q.new_empty((b, h, m), dtype=torch.float32)
    rbv = q.new_empty(0, dtype=torch.float32)
    if rel_table is not None:
        w = _saturation_width(rel_table.shape[0], bool(rel_bidirectional), int(rel_max_distance))
        rbv = q.new_empty((h, _rel_width(w, _VARIANT == "table")), dtype=_rbv_dtype(q.dtype))
    gq, gk = (2, b, cdiv(m, SEG_G)), (2, b, cdiv(n, SEG_G))
    if q_segment_ids is None:
        gq = gk = (0,)
    ranges = [q.new_empty(shape, dtype=torch.int32) for shape in (gq, gq, gk, gk)]
    return (out, lse, rbv, *ranges)


def _bwd_impl(
    do: torch.Tensor,
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    causal: bool,
    q_offset: int,
    q_offset_t: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    rel_table: Optional[torch.Tensor],
    rel_bidirectional: bool,
    rel_max_distance: int,
    alibi_slopes: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    q_segment_ids: Optional[torch.Tensor],
    kv_segment_ids: Optional[torch.Tensor],
    rbv: torch.Tensor,
    kv_lo: torch.Tensor,
    kv_hi: torch.Tensor,
    q_lo: torch.Tensor,
    q_hi: torch.Tensor,
    need_drel: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d q, d k, d v, d rel_table, d bias): the first three in the layout of the q, k, v arguments (a packed
    argument gets its packed gradient; the slot of a None argument an empty tensor)."""
    grads, views = _grad_buffers(q, k, v)
    q, k, v = unpack_qkv(q, k, v)
    a = _Args(
        q,
        k,
        scale,
        causal,
        q_offset,
        q_offset_t,
        bias,
        rel_table,
        rel_bidirectional,
        rel_max_distance,
        alibi_slopes,
        key_padding_mask,
        q_segment_ids,
        kv_segment_ids,
        saved=(rbv, kv_lo, kv_hi, q_lo, q_hi),
    )
    d_table, d_bias = _backward(
        do, q, k, v, out, lse, a, scale, need_drel, need_dbias, rel_table, bias, views
    )
    return (*grads, d_table, d_bias)


def _bwd_fake(
    do,
    q,
    k,
    v,
    out,
    lse,
    scale,
    causal,
    q_offset,
    q_offset_t,
    bias,
    rel_table,
    rel_bidirectional,
    rel_max_distance,
    alibi_slopes,
    key_padding_mask,
    q_segment_ids,
    kv_segment_ids,
    rbv,
    kv_lo,
    kv_hi,
    q_lo,
    q_hi,
    need_drel,
    need_dbias,
):
    d_table = rel_table.new_empty(rel_table.shape) if need_drel and rel_table is not None else q.new_empty(0)
    d_bias = bias.new_empty(bias.shape) if need_dbias and bias is not None else q.new_empty(0)
    empty = lambda t: q.new_empty(0) if t is None else torch.empty_like(t)
    return torch.empty_like(q), empty(k), empty(v), d_table, d_bias


_SAVED = (
    "q",
    "k",
    "v",
    "out",
    "lse",
    "q_offset_t",
    "bias",
    "rel_table",
    "alibi_slopes",
    "key_padding_mask",
    "q_segment_ids",
    "kv_segment_ids",
    "rbv",
    "kv_lo",
    "kv_hi",
    "q_lo",
    "q_hi",
)


def _setup_context(ctx, inputs, output):
    (
        q,
        k,
        v,
        scale,
        causal,
        q_offset,
        q_offset_t,
        bias,
        rel_table,
        rel_bidirectional,
        rel_max_distance,
        alibi_slopes,
        key_padding_mask,
        q_segment_ids,
        kv_segment_ids,
    ) = inputs
    out, lse, rbv, kv_lo, kv_hi, q_lo, q_hi = output
    ctx.mark_non_differentiable(rbv)
    ctx.save_for_backward(
        q,
        k,
        v,
        out,
        lse,
        q_offset_t,
        bias,
        rel_table,
        alibi_slopes,
        key_padding_mask,
        q_segment_ids,
        kv_segment_ids,
        rbv,
        kv_lo,
        kv_hi,
        q_lo,
        q_hi,
    )
    ctx.static = (scale, causal, q_offset, rel_bidirectional, rel_max_distance)


def _backward_rule(ctx, dout, *_, bwd):  # lse and the saved tensors get no gradient
    if dout is None:  # only lse was used: no gradient reaches the inputs
        return (None,) * 15
    s = dict(zip(_SAVED, ctx.saved_tensors))
    scale, causal, q_offset, rel_bidirectional, rel_max_distance = ctx.static
    need_dbias, need_drel = ctx.needs_input_grad[7], ctx.needs_input_grad[8]
    dq, dk, dv, d_table, d_bias = bwd(
        dout,
        s["q"],
        s["k"],
        s["v"],
        s["out"],
        s["lse"],
        scale,
        causal,
        q_offset,
        s["q_offset_t"],
        s["bias"],
        s["rel_table"],
        rel_bidirectional,
        rel_max_distance,
        s["alibi_slopes"],
        s["key_padding_mask"],
        s["q_segment_ids"],
        s["kv_segment_ids"],
        s["rbv"],
        s["kv_lo"],
        s["kv_hi"],
        s["q_lo"],
        s["q_hi"],
        need_drel,
        need_dbias,
    )
    return (
        dq,
        dk if s["k"] is not None else None,
        dv if s["v"] is not None else None,
        None,
        None,
        None,
        None,
        d_bias if need_dbias else None,
        d_table if need_drel else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


_attention, _fwd_op, _bwd_op = op_pair(
    "flash_attention", _fwd_impl, _fwd_fake, _bwd_impl, _bwd_fake, _setup_context, _backward_rule
)


# --------------------------------------------------------------------------------------------- public
def autotuned_configs() -> dict[str, dict[str, str]]:
    """The autotuner's pick per kernel and tuning key in this process, as strings (for benchmark reports: each
    process tunes anew, and a different pick is the first suspect when a timing moves between runs)."""
    kernels = {"_fwd_kernel": _fwd_kernel, "_dkv_kernel": _dkv_kernel, "_dq_kernel": _dq_kernel}
    return {
        name: {str(k): str(v) for k, v in getattr(kern, "cache", {}).items()}
        for name, kern in kernels.items()
    }


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    *,
    scale: float = 1.0,
    causal: bool = False,
    q_offset: int | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    rel_table: torch.Tensor | None = None,
    rel_bidirectional: bool = True,
    rel_max_distance: int = 128,
    alibi_slopes: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    q_segment_ids: torch.Tensor | None = None,
    kv_segment_ids: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Triton attention with exactly ``attention_ref``'s semantics (see the module docstring). q, k, v may be
    packed (``ops.attention.unpack_qkv``): the backward then writes the packed tensor's gradient in place."""
    args = (q, k, v)
    q, k, v = unpack_qkv(q, k, v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D (B, H, L, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, m, d = q.shape
    n = k.shape[2]
    if k.shape != (b, h, n, d) or v.shape != (b, h, n, d):
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected (B, H, M|N, D)"
            " with one head dim for q, k and v"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"q, k, v must share one dtype among float16/bfloat16/float32, got {q.dtype}, {k.dtype}, "
            f"{v.dtype}"
        )
    if d > 256:
        raise ValueError(f"head dim {d} > 256 is not supported by the Triton kernel; use attention_ref")
    if sum(x is not None for x in (bias, rel_table, alibi_slopes)) > 1:
        raise ValueError("give at most one of bias, rel_table, alibi_slopes")
    if dropout_p > 0.0:
        raise NotImplementedError(
            "flash_attention has no attention dropout; use attention_ref for dropout_p > 0"
        )
    if rel_table is not None and (rel_table.dim() != 2 or rel_table.shape[1] != h):
        raise ValueError(f"rel_table must be (num_buckets, heads={h}), got {tuple(rel_table.shape)}")
    if alibi_slopes is not None and alibi_slopes.shape != (h,):
        raise ValueError(f"alibi_slopes must be (heads,) = ({h},), got {tuple(alibi_slopes.shape)}")
    if bias is not None:
        try:
            torch.broadcast_shapes(tuple(bias.shape), (b, h, m, n))
        except RuntimeError as e:
            raise ValueError(
                f"bias {tuple(bias.shape)} does not broadcast to (B, H, M, N) = {(b, h, m, n)}"
            ) from e
        if bias.dim() > 4:
            raise ValueError(f"bias must have at most 4 dims, got {tuple(bias.shape)}")
    if key_padding_mask is not None and key_padding_mask.shape != (b, n):
        raise ValueError(
            f"key_padding_mask must be (batch, keys) = {(b, n)}, got {tuple(key_padding_mask.shape)}"
        )
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None and (q_segment_ids.shape != (b, m) or kv_segment_ids.shape != (b, n)):
        raise ValueError(
            f"segment ids must be (batch, queries) = {(b, m)} and (batch, keys) = {(b, n)}, got "
            f"{tuple(q_segment_ids.shape)} and {tuple(kv_segment_ids.shape)}"
        )
    q_offset_t = None
    if q_offset is None:
        q_offset = n - m
    elif isinstance(q_offset, torch.Tensor):
        if q_offset.dim() != 0 or q_offset.dtype.is_floating_point or q_offset.dtype == torch.bool:
            raise ValueError(
                f"a tensor q_offset must be a 0-dim integer tensor, got {q_offset.dtype} "
                f"{tuple(q_offset.shape)}"
            )
        q_offset_t, q_offset = q_offset.to(q.device), 0
    out = _attention(
        *args,
        float(scale),
        bool(causal),
        int(q_offset),
        q_offset_t,
        bias,
        rel_table,
        bool(rel_bidirectional),
        int(rel_max_distance),
        alibi_slopes,
        key_padding_mask,
        q_segment_ids,
        kv_segment_ids,
    )[0]
    return out
