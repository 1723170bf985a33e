"""The UL2 mixture of denoisers (Tay et al. 2022, "UL2: Unifying Language Learning Paradigms").

Three kinds of denoiser turn a piece of a document (token ids, no eos) into an (inputs, targets) pair:

* ``R`` / ``X`` — T5 span corruption (Raffel et al. 2020). ``random_spans_noise_mask`` follows T5's
  ``random_spans_noise_mask``: ``noise = round(L * density)`` (clamped to [1, L-1]),
  ``spans = round(noise / mean_span)`` (at least 1), noise and non-noise tokens are each split into
  ``spans`` random non-empty runs, and runs alternate starting with non-noise. Inputs are
  ``[mode] + text with each noise span replaced by one sentinel + [eos]``; targets are
  ``sentinel + span tokens`` for each span, then ``[eos]``. Sentinels count from ``<extra_id_0>`` in every
  piece. A one-token piece is a single noise span. ``R`` (regular) and ``X`` (extreme) differ only in
  their parameters and mode token.
* ``S`` — prefix LM: the split point ``p`` (prefix length) is drawn uniformly in ``[1, L-1]``; inputs are
  ``[mode] + piece[:p] + [eos]``, targets ``piece[p:] + [eos]``. (A one-token piece has an empty prefix.)

``max_piece_length`` computes, per denoiser, the longest piece whose inputs fit ``enc_len`` and whose
targets fit ``dec_len`` — for every random draw, so no example is ever truncated — and whose spans do
not need more sentinels than the tokenizer has (with 100 sentinels, X(3, 0.5) pieces are capped at
about 600 tokens: a denoiser whose spans would need more gets shorter pieces, not reused sentinels).
Longer documents are cut into consecutive pieces by the collator (``packing.UL2Batches``), each piece
drawing its own denoiser.

Limits: the input/target length ratio is set by the mixture, not by packing: with the default mixture
the targets hold about half as many tokens as the inputs, so equal ``enc_len`` and ``dec_len`` leave about
half of the decoder as padding (see benchmarks/bench_data.py; ``dec_len ~ enc_len / 2`` balances them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Denoiser:
    """One denoising task: ``kind`` "R"/"X" (span corruption) or "S" (prefix LM), and its mode token."""

    kind: str
    mean_span: float = 3.0
    noise_density: float = 0.15
    mode_token: str | None = None

    def __post_init__(self):
        if self.kind not in ("R", "X", "S"):
            raise ValueError(f"denoiser kind must be 'R', 'X' or 'S', got {self.kind!r}")
        if self.kind != "S":
            if not 0.0 < self.noise_density < 1.0:
                raise ValueError(f"noise_density must be in (0, 1), got {self.noise_density}")
            if self.mean_span < 1.0:
                raise ValueError(f"mean_span must be >= 1, got {self.mean_span}")

    @property
    def name(self) -> str:
        if self.kind == "S":
            return f"S{'' if self.mode_token else '(no mode)'}"
        return f"{self.kind}(span={self.mean_span:g}, rate={self.noise_density:g})"


@dataclass(frozen=True)
class Mixture:
    """Denoisers and their sampling weights (normalised to probabilities)."""

    denoisers: tuple[Denoiser, ...]
    weights: tuple[float, ...] = field(default=())

    def __post_init__(self):
        object.__setattr__(self, "denoisers", tuple(self.denoisers))
        w = tuple(float(x) for x in self.weights) or (1.0,) * len(self.denoisers)
        object.__setattr__(self, "weights", w)
        if not self.denoisers:
            raise ValueError("a mixture needs at least one denoiser")
        if len(w) != len(self.denoisers):
            raise ValueError(f"{len(self.denoisers)} denoisers but {len(w)} weights")
        if min(w) < 0 or sum(w) <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {w}")

    @property
    def probabilities(self) -> np.ndarray:
        w = np.asarray(self.weights, dtype=np.float64)
        return w / w.sum()

    @classmethod
    def ul2(cls) -> Mixture:
        """The seven denoisers of UL2 with the seed's proportions."""
        return cls(
            (
                Denoiser("R", 3, 0.15, "[R]"),
                Denoiser("R", 8, 0.15, "[R]"),
                Denoiser("S", mode_token="[S]"),
                Denoiser("X", 3, 0.5, "[X]"),
                Denoiser("X", 8, 0.15, "[X]"),
                Denoiser("X", 64, 0.15, "[X]"),
                Denoiser("X", 64, 0.5, "[X]"),
            ),
            (0.165, 0.165, 0.34, 0.0825, 0.0825, 0.0825, 0.0825),
        )

    @classmethod
    def t5(cls, noise_density: float = 0.15, mean_span: float = 3.0) -> Mixture:
        """Plain T5 span corruption: one denoiser, no mode token."""
        return cls((Denoiser("R", mean_span, noise_density, None),), (1.0,))

    def to_dict(self) -> dict:
        return {"denoisers": [d.__dict__.copy() for d in self.denoisers], "weights": list(self.weights)}

    @classmethod
    def from_dict(cls, d: dict) -> Mixture:
        unknown = set(d) - {"denoisers", "weights"}
        if unknown:
            raise ValueError(f"unknown mixture keys {sorted(unknown)}: expected 'denoisers' and 'weights'")
        return cls(tuple(Denoiser(**x) for x in d["denoisers"]), tuple(d.get("weights", ())))


# ------------------------------------------------------------------------------------- span corruption
@lru_cache(maxsize=65536)
def span_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a piece of ``length`` tokens, as in T5 (plus clamps for tiny pieces)."""
    if length <= 1:
        return length, length
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = max(int(round(noise / mean_span)), 1)
    return noise, min(spans, noise, length - noise)


def _segment(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    # A uniformly random composition of num_items into num_segments non-empty runs (T5's _random_segmentation).
    if num_segments == 1:
        return np.array([num_items])
    cuts = rng.choice(num_items - 1, num_segments - 1, replace=False)
    cuts.sort()
    # run lengths are the gaps between 0, cuts + 1, ..., num_items (np.diff's prepend/append is slow here)
    bounds = np.empty(num_segments + 1, dtype=np.int64)
    bounds[0], bounds[1:-1], bounds[-1] = -1, cuts, num_items - 1
    return bounds[1:] - bounds[:-1]


# (non-noise, noise) alternation for up to _MAX_ALT spans; sliced instead of rebuilt per piece.
_MAX_ALT = 4096
_ALT = np.tile(np.array([False, True]), _MAX_ALT)


def _span_runs(length: int, noise: int, spans: int, rng: np.random.Generator) -> np.ndarray:
    # Run lengths (non-noise, noise) * spans: the noise mask is these runs of False / True, alternating.
    runs = np.empty(2 * spans, dtype=np.int64)
    runs[0::2] = _segment(length - noise, spans, rng)
    runs[1::2] = _segment(noise, spans, rng)
    return runs


def _runs_mask(runs: np.ndarray) -> np.ndarray:
    alt = _ALT[: len(runs)] if len(runs) <= 2 * _MAX_ALT else np.tile(np.array([False, True]), len(runs) // 2)
    return np.repeat(alt, runs)


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask (True = noise) of ``length`` tokens: alternating non-noise / noise runs, as in T5."""
    noise, spans = span_counts(length, noise_density, mean_span)
    if noise == length:
        return np.ones(length, dtype=bool)
    return _runs_mask(_span_runs(length, noise, spans, rng))


def denoise(
    tokens: np.ndarray,
    denoiser: Denoiser,
    rng: np.random.Generator,
    sentinels: np.ndarray,
    eos_id: int,
    mode_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One (inputs, targets) pair of int64 arrays for a piece ``tokens`` (no eos), as described above."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n = tokens.size
    if n == 0:
        raise ValueError("cannot denoise an empty piece")
    m = 0 if mode_id is None else 1
    if denoiser.kind == "S":
        p = int(rng.integers(1, n)) if n > 1 else 0
        inputs = np.empty(m + p + 1, dtype=np.int64)
        targets = np.empty(n - p + 1, dtype=np.int64)
        inputs[m:-1], targets[:-1] = tokens[:p], tokens[p:]
    else:
        noise, spans = span_counts(n, denoiser.noise_density, denoiser.mean_span)
        if spans > len(sentinels):
            raise ValueError(
                f"a piece of {n} tokens needs {spans} sentinels, the tokenizer has {len(sentinels)}"
            )
        if noise == n:  # one-token piece: all noise, no non-noise run to carry the sentinel
            inputs = np.empty(m + 2, dtype=np.int64)
            inputs[m] = sentinels[0]
            targets = np.concatenate((sentinels[:1], tokens, [eos_id]))
        else:
            # Built straight from the run lengths (same draws and result as masking with
            # random_spans_noise_mask and replacing each run by a sentinel, without the per-run scans).
            runs = _span_runs(n, noise, spans, rng)
            mask = _runs_mask(runs)
            ends = np.cumsum(runs)  # ends[2i]: start of noise span i; ends[2i-1]: start of kept run i
            sent = sentinels[:spans]
            # inputs: kept tokens, each noise span replaced by its sentinel
            keep = ~mask
            first = ends[0::2]
            keep[first] = True
            body = tokens.copy()
            body[first] = sent
            inputs = np.empty(m + n - noise + spans + 1, dtype=np.int64)
            inputs[m:-1] = body[keep]
            # targets: each span's sentinel, then its tokens
            mask[0] = True
            mask[ends[1:-1:2]] = True
            body[0] = sent[0]
            body[ends[1:-1:2]] = sent[1:]
            body[first] = tokens[first]
            targets = np.empty(noise + spans + 1, dtype=np.int64)
            targets[:-1] = body[mask]
    if m:
        inputs[0] = mode_id
    inputs[-1] = targets[-1] = eos_id
    return inputs, targets


def example_lengths(denoiser: Denoiser, length: int) -> tuple[int, int, int]:
    """(max inputs length, max targets length, sentinels needed) over all draws for a piece of ``length``."""
    m = 1 if denoiser.mode_token else 0
    if denoiser.kind == "S":
        return m + max(length - 1, 0) + 1, max(length - 1, 1) + 1, 0
    noise, spans = span_counts(length, denoiser.noise_density, denoiser.mean_span)
    return m + length - noise + spans + 1, noise + spans + 1, spans


def max_piece_length(denoiser: Denoiser, enc_len: int, dec_len: int, num_sentinels: int) -> int:
    """Longest piece whose every denoising fits ``enc_len`` / ``dec_len`` and the sentinel supply."""

    def fits(length: int) -> bool:
        e, d, s = example_lengths(denoiser, length)
        return e <= enc_len and d <= dec_len and s <= num_sentinels

    if not fits(1):
        raise ValueError(
            f"enc_len={enc_len}, dec_len={dec_len} cannot hold even a one-token {denoiser.name} example "
            f"(needs {example_lengths(denoiser, 1)[:2]}; sentinels available: {num_sentinels})"
        )
    # Lengths grow monotonically with the piece, so bisect for the last piece length that fits.
    lo, hi = 1, enc_len + dec_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo
