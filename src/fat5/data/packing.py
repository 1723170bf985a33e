"""Packing denoised examples into fixed-shape rows, and the resumable UL2 batch stream.

``Packer.pack`` places (inputs, targets) examples into ``batch_size`` rows of ``enc_len`` encoder and
``dec_len`` decoder tokens by first-fit over a buffer: examples carried over twice or more go first (so
none starves), then longest inputs first; an example goes to the first row with room for both its inputs
and its targets. Examples that fit nowhere are returned and carried to the next batch — nothing is
dropped or truncated. Example ``k`` (1-based) of a row gets segment id ``k`` in both encoder and decoder;
the model lets a token attend only within its segment, so packed examples never see each other.

Batch format (all ``torch.int64``)::

    input_ids              (B, enc_len)  pad id 0 on padding
    attention_mask         (B, enc_len)  1 on real tokens
    segment_ids            (B, enc_len)  1, 2, ... per packed example, 0 on padding
    decoder_input_ids      (B, dec_len)  each example's targets shifted right, starting with
                                         decoder_start_token_id (= pad id 0)
    decoder_attention_mask (B, dec_len)
    decoder_segment_ids    (B, dec_len)  same ids as the example's encoder segment
    labels                 (B, dec_len)  targets, -100 on padding

``UL2Batches`` is the stream: an ``IterableDataset`` over a ``TokenDataset`` that shuffles documents per
epoch (seeded), cuts them into pieces that fit (``ul2.max_piece_length``), draws a denoiser per piece,
denoises and packs. Documents are split between readers as ``permutation[shard::num_shards]`` with
``shard = rank * num_workers + worker_id``, so ranks and DataLoader workers read disjoint shares.
``state_dict()`` records the exact position (epoch, document, offset in it, RNG state, carried-over
examples); ``load_state_dict`` continues the same stream.

Limits: the recorded position is exact when the stream is iterated in the process that calls
``state_dict()`` (``num_workers=0``, one core packs well over 1M tokens/s). Inside DataLoader worker
processes each worker keeps its own position, which the main process cannot see; such a run resumes at
the start of the recorded epoch. With ``epochs`` set (finite stream) the last batches may hold empty rows
(all padding), and different ranks may produce different numbers of batches.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .tokenizer import mode_token_ids, sentinel_ids, tokenizer_hash
from .ul2 import Mixture, denoise, example_lengths, max_piece_length

Example = tuple[np.ndarray, np.ndarray]


class Packer:
    """First-fit packing of examples into ``batch_size`` rows (see the module docstring)."""

    def __init__(self, batch_size: int, enc_len: int, dec_len: int, pad_id: int = 0, start_id: int = 0):
        if batch_size < 1 or enc_len < 2 or dec_len < 2:
            raise ValueError(f"need batch_size >= 1 and lengths >= 2, got {batch_size}, {enc_len}, {dec_len}")
        self.batch_size, self.enc_len, self.dec_len = batch_size, enc_len, dec_len
        self.pad_id, self.start_id = pad_id, start_id

    def pack(self, items: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[dict, list]:
        """Pack ``(inputs, targets, age)`` items; returns (numpy batch dict, leftover items with age + 1)."""
        rows, _, _, left = self.place(items)
        return self.assemble(rows), left

    def place(self, items: list[tuple[np.ndarray, np.ndarray, int]]):
        """First-fit ``items`` into rows; returns (rows of items, free encoder / decoder room, leftovers)."""
        B, E, D = self.batch_size, self.enc_len, self.dec_len
        enc = [len(it[0]) for it in items]
        dec = [len(it[1]) for it in items]
        if items and (max(enc) > E or max(dec) > D):
            raise ValueError(f"an example of {max(enc)}/{max(dec)} tokens exceeds the rows ({E}/{D})")
        # old (carried over twice or more) first, then largest in its fuller dimension first; stable
        order = sorted(range(len(items)), key=lambda i: (items[i][2] < 2, -max(enc[i] / E, dec[i] / D)))
        # Plain Python lists: with tens of rows, per-row scalar tests beat numpy's per-call overhead.
        free_e, free_d = [E] * B, [D] * B
        rows: list[list] = [[] for _ in range(B)]
        left = []
        for i in order:
            e, d = enc[i], dec[i]
            # Of the rows with room, take the one left most balanced between encoder and decoder room, so
            # input-heavy and target-heavy examples pair up instead of stranding space in one of the two.
            best, best_skew = -1, 0.0
            for r in range(B):
                fe, fd = free_e[r], free_d[r]
                if fe >= e and fd >= d:
                    skew = abs((fe - e) / E - (fd - d) / D)
                    if best < 0 or skew < best_skew:
                        best, best_skew = r, skew
            if best < 0:
                left.append(i)
                continue
            rows[best].append(items[i])
            free_e[best] -= e
            free_d[best] -= d
        left.sort()
        return rows, free_e, free_d, [(items[i][0], items[i][1], items[i][2] + 1) for i in left]

    def assemble(self, rows: list[list]) -> dict:
        """The batch dict of ``rows`` (lists of items), written with one scatter per array."""
        B, E, D = self.batch_size, self.enc_len, self.dec_len
        input_ids = np.full((B, E), self.pad_id, np.int64)
        seg = np.zeros((B, E), np.int64)
        dec_in = np.full((B, D), self.pad_id, np.int64)
        labels = np.full((B, D), -100, np.int64)
        dseg = np.zeros((B, D), np.int64)
        items = [it for row in rows for it in row]
        if items:
            counts = [len(row) for row in rows]
            row_of = np.repeat(np.arange(B), counts)
            first = (np.cumsum(counts) - counts)[row_of]  # index of the first item of each item's row
            k = np.arange(len(items)) - first + 1  # segment id of each item
            for arrs, L, ids, segs in ((0, E, input_ids, seg), (1, D, labels, dseg)):
                toks = [it[arrs] for it in items]
                n = np.fromiter(map(len, toks), np.int64, len(toks))
                ends = np.cumsum(n)
                starts = ends - n  # of each item in the concatenation
                # token j of the concatenation goes to row * L + (j - start of its row's first item)
                flat = np.repeat(row_of * L - starts[first], n) + np.arange(ends[-1])
                t = np.concatenate(toks)
                ids.reshape(-1)[flat] = t
                segs.reshape(-1)[flat] = np.repeat(k, n)
            # decoder inputs: each example's targets shifted right, starting with the start token
            shifted = np.empty_like(t)
            shifted[1:] = t[:-1]
            shifted[starts] = self.start_id
            dec_in.reshape(-1)[flat] = shifted
        return {
            "input_ids": input_ids,
            "attention_mask": (seg > 0).astype(np.int64),
            "segment_ids": seg,
            "decoder_input_ids": dec_in,
            "decoder_attention_mask": (dseg > 0).astype(np.int64),
            "decoder_segment_ids": dseg,
            "labels": labels,
        }


class UL2Batches(IterableDataset):
    """Endless (or ``epochs``-long) stream of packed UL2 batches from a ``TokenDataset`` (see module doc).

    Pieces are at most ``max_piece_fraction`` of the longest that fits a row. At 1.0 (full context) a
    maximal piece fills one side of a row (a long R piece fills the encoder, an X(64, 0.5) piece the
    decoder) and leaves the other side's room stranded (~5% encoder padding at 512/512 and 1024/1024);
    the default 0.5 lets input-heavy and target-heavy pieces share rows (~0.3% encoder padding) at the
    cost of shorter contexts (benchmarks/results/data-2026-11-29.md). Remaining room in each row is
    filled with pieces cut to fit it (at least ``min_piece`` tokens, or a document's whole tail); a
    drawn denoiser that does not fit is kept for a later batch, not redrawn, so the mixture
    proportions hold.

    Decoder padding is set by the mixture, not by packing: nothing is dropped and the carried-over
    buffer stays small, so over the stream decoder tokens / encoder tokens tends to the mixture's
    target/input ratio rho (about 0.5 for the default mixture) and the decoder padding is at least
    ``1 - rho * (1 - encoder padding) * enc_len / dec_len`` whatever order examples are packed in.

    ``stats`` holds running counters (examples per denoiser, real and total tokens); ``padding()``
    returns the encoder and decoder padding fractions so far.
    """

    def __init__(
        self,
        dataset,
        tokenizer,
        mixture: Mixture | None = None,
        enc_len: int = 512,
        dec_len: int = 512,
        batch_size: int = 8,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
        buffer_slack: float = 1.25,
        min_piece: int = 8,
        max_misses: int = 2,
        max_piece_fraction: float = 0.5,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.dataset, self.mixture = dataset, mixture or Mixture.ul2()
        self.enc_len, self.dec_len, self.batch_size = enc_len, dec_len, batch_size
        self.seed, self.rank, self.world_size, self.epochs = seed, rank, world_size, epochs
        self.buffer_slack, self.min_piece, self.max_misses = buffer_slack, min_piece, max_misses
        dens = self.mixture.denoisers
        needs_sentinels = any(d.kind != "S" for d in dens)
        self.sentinels = np.asarray(sentinel_ids(tokenizer) if needs_sentinels else [], dtype=np.int64)
        modes = mode_token_ids(tokenizer, sorted({d.mode_token for d in dens if d.mode_token}))
        self.mode_ids = [modes[d.mode_token] if d.mode_token else None for d in dens]
        self.eos_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        if self.eos_id is None or pad is None:
            raise ValueError("the tokenizer needs an eos token and a pad token (T5: </s> and <pad>)")
        self.packer = Packer(batch_size, enc_len, dec_len, pad_id=pad, start_id=pad)
        if not 0.0 < max_piece_fraction <= 1.0:
            raise ValueError(f"max_piece_fraction must be in (0, 1], got {max_piece_fraction}")
        self.max_len = np.array(
            [
                max(1, int(max_piece_fraction * max_piece_length(d, enc_len, dec_len, len(self.sentinels))))
                for d in dens
            ]
        )
        firsts = [example_lengths(d, 1) for d in dens]
        self._min_room = (min(f[0] for f in firsts), min(f[1] for f in firsts))
        self._fit_cache: dict[tuple[int, int, int], int] = {}
        self._cum = np.cumsum(self.mixture.probabilities)
        self._cum[-1] = 1.0
        data_hash = getattr(dataset, "manifest", {}).get("tokenizer_hash")
        if data_hash is not None and data_hash != tokenizer_hash(tokenizer):
            raise ValueError(
                f"{dataset.path} was tokenized with another tokenizer (hash {data_hash}, this one "
                f"{tokenizer_hash(tokenizer)}): pass the tokenizer used by `fat5 data prepare`"
            )
        self._states: dict[int, dict] = {}
        self._num_shards = world_size
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._cur_doc: tuple[int, np.ndarray | None] = (-1, None)
        self.reset_stats()

    # ------------------------------------------------------------------------------------- counters
    def reset_stats(self) -> None:
        self.stats = {
            "batches": 0,
            "examples": [0] * len(self.mixture.denoisers),
            "raw_tokens": 0,
            "enc_tokens": 0,
            "dec_tokens": 0,
            "carried_over": 0,
        }

    def padding(self) -> tuple[float, float]:
        """Fraction of encoder and decoder positions that were padding, over the batches so far."""
        n = max(self.stats["batches"] * self.batch_size, 1)
        return (
            1.0 - self.stats["enc_tokens"] / (n * self.enc_len),
            1.0 - self.stats["dec_tokens"] / (n * self.dec_len),
        )

    # ------------------------------------------------------------------------------------ the stream
    def _shard(self) -> tuple[int, int]:
        w = get_worker_info()
        nw, wid = (w.num_workers, w.id) if w is not None else (1, 0)
        return self.rank * nw + wid, self.world_size * nw

    def _docs(self, epoch: int, shard: int, num_shards: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1][shard::num_shards]

    def _fresh_state(self, shard: int, num_shards: int) -> dict:
        rng = np.random.default_rng([self.seed, 1 + shard, num_shards])
        return {"epoch": 0, "pos": 0, "offset": 0, "rng": rng.bit_generator.state, "leftovers": []}

    def _fit(self, d: int, room_e: int, room_d: int) -> int:
        key = (d, int(room_e), int(room_d))
        n = self._fit_cache.get(key)
        if n is None:
            den = self.mixture.denoisers[d]
            fits = example_lengths(den, 1)
            ok = fits[0] <= room_e and fits[1] <= room_d and fits[2] <= len(self.sentinels)
            n = max_piece_length(den, room_e, room_d, len(self.sentinels)) if ok else 0
            if len(self._fit_cache) > 100_000:
                self._fit_cache.clear()
            self._fit_cache[key] = n
        return n

    def _doc(self, i: int) -> np.ndarray:
        # The current document as a plain int64 array: it yields several pieces, and slicing a memmap
        # (and converting each piece) costs more than the denoising of a short piece.
        if self._cur_doc[0] != i:
            self._cur_doc = (i, np.asarray(self.dataset[i], dtype=np.int64))
        return self._cur_doc[1]

    def _next_example(self, st: dict, rng, docs: list, room: tuple[int, int] | None = None):
        """The next (inputs, targets) and whether it was cut to fit ``room``; None when data runs out."""
        while True:
            if st["pos"] >= len(docs[0]):
                st["epoch"], st["pos"], st["offset"] = st["epoch"] + 1, 0, 0
                if self.epochs is not None and st["epoch"] >= self.epochs:
                    return None
                docs[0] = self._docs(st["epoch"], *docs[1:])
                continue
            doc = self._doc(int(docs[0][st["pos"]]))
            if st["offset"] >= len(doc):
                st["pos"], st["offset"] = st["pos"] + 1, 0
                continue
            d = int(np.searchsorted(self._cum, rng.random(), side="right"))
            n = min(len(doc) - st["offset"], int(self.max_len[d]))
            fits = room is None
            if room is not None:
                cap = self._fit(d, *room)
                if cap >= min(n, self.min_piece):
                    n, fits = int(min(n, cap)), True
            piece = doc[st["offset"] : st["offset"] + n]
            st["offset"] += n
            self.stats["examples"][d] += 1
            self.stats["raw_tokens"] += n
            ex = denoise(piece, self.mixture.denoisers[d], rng, self.sentinels, self.eos_id, self.mode_ids[d])
            return ex, fits

    def __iter__(self):
        shard, num_shards = self._shard()
        if len(self.dataset) < num_shards:
            raise ValueError(
                f"the dataset has {len(self.dataset)} documents, fewer than its {num_shards} readers "
                "(ranks x DataLoader workers)"
            )
        if self._states and self._num_shards != num_shards:
            raise ValueError(
                f"the loaded state was recorded with {self._num_shards} readers, this run has {num_shards}: "
                "resume with the same world size and number of DataLoader workers"
            )
        self._num_shards = num_shards
        st = self._states.get(shard) or self._fresh_state(shard, num_shards)
        self._states[shard] = st
        rng = np.random.default_rng()
        rng.bit_generator.state = st["rng"]
        buffer = [(np.asarray(i, np.int64), np.asarray(t, np.int64), a) for i, t, a in st["leftovers"]]
        docs = [self._docs(st["epoch"], shard, num_shards), shard, num_shards]
        exhausted = self.epochs is not None and st["epoch"] >= self.epochs
        cap_e = self.buffer_slack * self.batch_size * self.enc_len
        cap_d = self.buffer_slack * self.batch_size * self.dec_len
        while True:
            # 1. Fill the buffer (carried-over examples first) to a bit more than one batch of tokens.
            sum_e = sum(len(b[0]) for b in buffer)
            sum_d = sum(len(b[1]) for b in buffer)
            while not exhausted and sum_e < cap_e and sum_d < cap_d:
                ex = self._next_example(st, rng, docs)
                if ex is None:
                    exhausted = True
                    break
                buffer.append((ex[0][0], ex[0][1], 0))
                sum_e += len(ex[0][0])
                sum_d += len(ex[0][1])
            if not buffer:
                return
            # 2. First-fit the buffer into rows; what does not fit waits for the next batch.
            rows, free_e, free_d, buffer = self.packer.place(buffer)
            # 3. Fill each row's remaining room with pieces cut to fit it.
            for r in range(self.batch_size):
                misses = 0
                while not exhausted and free_e[r] >= self._min_room[0] and free_d[r] >= self._min_room[1]:
                    ex = self._next_example(st, rng, docs, room=(free_e[r], free_d[r]))
                    if ex is None:
                        exhausted = True
                        break
                    (inp, tgt), fits = ex
                    if not fits:  # the drawn denoiser needs more room: keep its example for later
                        buffer.append((inp, tgt, 0))
                        misses += 1
                        if misses > self.max_misses:
                            break
                        continue
                    rows[r].append((inp, tgt, 0))
                    free_e[r] -= len(inp)
                    free_d[r] -= len(tgt)
            batch = self.packer.assemble(rows)
            st["rng"] = rng.bit_generator.state
            st["leftovers"] = buffer  # arrays, made JSON-ready only by state_dict()
            self.stats["batches"] += 1
            self.stats["enc_tokens"] += int(np.count_nonzero(batch["segment_ids"]))
            self.stats["dec_tokens"] += int(np.count_nonzero(batch["decoder_segment_ids"]))
            self.stats["carried_over"] = len(buffer)
            yield {k: torch.from_numpy(v) for k, v in batch.items()}

    # ------------------------------------------------------------------------------------ resumption
    def _signature(self) -> dict:
        return {
            "seed": self.seed,
            "enc_len": self.enc_len,
            "dec_len": self.dec_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "rank": self.rank,
            "mixture": self.mixture.to_dict(),
            "num_docs": len(self.dataset),
        }

    def state_dict(self) -> dict:
        """The stream position (JSON-serialisable), to save with a checkpoint."""
        return {
            "version": 1,
            **self._signature(),
            "num_shards": self._num_shards,
            "streams": {str(k): _export(v) for k, v in self._states.items()},
            "stats": copy.deepcopy(self.stats),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream recorded by ``state_dict()``; the settings must match."""
        sig = self._signature()
        diff = {k: (state.get(k), v) for k, v in sig.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"the data-stream state was recorded with other settings (saved, now): {diff}")
        self._num_shards = int(state["num_shards"])
        self._states = {int(k): copy.deepcopy(v) for k, v in state["streams"].items()}
        self.stats = copy.deepcopy(state["stats"])


def _export(st: dict) -> dict:
    """A JSON-ready deep copy of one reader's position (the live one keeps its leftovers as arrays)."""
    out = copy.deepcopy({k: v for k, v in st.items() if k != "leftovers"})
    out["leftovers"] = [
        (np.asarray(i).tolist(), np.asarray(t).tolist(), int(a)) for i, t, a in st["leftovers"]
    ]
    return out
