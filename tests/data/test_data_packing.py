import json
from collections import Counter

import numpy as np
import pytest
import torch
from data_helpers import reconstruct, unpack
from torch.utils.data import DataLoader

from fat5.data import Mixture, Packer, TokenDataset, UL2Batches, mode_token_ids, sentinel_ids

KEYS = {
    "input_ids",
    "attention_mask",
    "segment_ids",
    "decoder_input_ids",
    "decoder_attention_mask",
    "decoder_segment_ids",
    "labels",
}


def _stream(data_dir, tok, **kw):
    args = dict(enc_len=128, dec_len=64, batch_size=4, seed=0)
    args.update(kw)
    return UL2Batches(
        TokenDataset(data_dir),
        tok,
        kw.pop("mixture", None) or Mixture.ul2(),
        **{k: v for k, v in args.items() if k != "mixture"},
    )


def _all_tokens(batches, tok):
    sent, modes = sentinel_ids(tok), set(mode_token_ids(tok).values())
    counts = Counter()
    for b in batches:
        for inp, tgt in unpack(b):
            counts.update(reconstruct(inp, tgt, sent, modes))
    return counts


def test_batch_format_and_packing(data_dir, tok):
    it = _stream(data_dir, tok, enc_len=256, dec_len=128, batch_size=6)
    sent, modes = sentinel_ids(tok), set(mode_token_ids(tok).values())
    for i, b in enumerate(it):
        assert set(b) == KEYS
        assert all(v.dtype == torch.int64 for v in b.values())
        assert b["input_ids"].shape == (6, 256) and b["labels"].shape == (6, 128)
        for inp, tgt in unpack(b):  # rows never mix examples; each example is intact
            assert inp[-1] == tok.eos_token_id and tgt[-1] == tok.eos_token_id
            assert len(reconstruct(inp, tgt, sent, modes)) > 0
        if i == 20:
            break
    assert max(b["segment_ids"].max() for b in [b]) >= 1
    enc_pad, dec_pad = it.padding()
    assert 0 <= enc_pad < 0.5 and 0 <= dec_pad < 0.5
    assert it.stats["batches"] == 21 and sum(it.stats["examples"]) > 21


def test_mixture_proportions(data_dir, tok):
    it = _stream(data_dir, tok, enc_len=64, dec_len=64, batch_size=16)
    for i, _ in enumerate(it):
        if i == 150:
            break
    n = np.array(it.stats["examples"])
    p = Mixture.ul2().probabilities
    sigma = np.sqrt(n.sum() * p * (1 - p))
    assert n.sum() > 3000
    assert np.all(np.abs(n - n.sum() * p) < 4 * sigma), (n, n.sum() * p)


def test_same_seed_same_batches_and_resume(data_dir, tok):
    a = [b for _, b in zip(range(6), _stream(data_dir, tok))]
    b = [b for _, b in zip(range(6), _stream(data_dir, tok))]
    c = [b for _, b in zip(range(6), _stream(data_dir, tok, seed=1))]
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS)
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))

    first = _stream(data_dir, tok)
    gen = iter(first)
    for _ in range(3):
        next(gen)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert state["streams"]["0"]["leftovers"] is not None
    rest = [next(gen) for _ in range(3)]
    resumed = _stream(data_dir, tok)
    resumed.load_state_dict(state)
    again = [b for _, b in zip(range(3), resumed)]
    assert all(torch.equal(x[k], y[k]) for x, y in zip(rest, again) for k in KEYS)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a[3:], again) for k in KEYS)
    with pytest.raises(ValueError, match="other settings"):
        _stream(data_dir, tok, enc_len=256).load_state_dict(state)


def test_one_epoch_gives_all_data(data_dir, tok):
    ds = TokenDataset(data_dir)
    want = Counter(np.concatenate([ds[i] for i in range(len(ds))]).tolist())
    it = _stream(data_dir, tok, epochs=1, batch_size=8)
    assert _all_tokens(it, tok) == want
    assert it.stats["raw_tokens"] == ds.num_tokens
    # two DataLoader workers split the documents between them and together see everything once
    loader = DataLoader(_stream(data_dir, tok, epochs=1, batch_size=8), batch_size=None, num_workers=2)
    assert _all_tokens(loader, tok) == want
    # two ranks read disjoint shares
    parts = [_all_tokens(_stream(data_dir, tok, epochs=1, rank=r, world_size=2), tok) for r in range(2)]
    assert parts[0] + parts[1] == want and parts[0] and parts[1]


def test_packer_carries_leftovers():
    p = Packer(batch_size=2, enc_len=10, dec_len=6)
    items = [(np.arange(3, 3 + n), np.array([5, 1]), 0) for n in (8, 7, 4, 3, 2)]
    batch, left = p.pack(items)
    placed = np.count_nonzero(batch["segment_ids"])
    assert placed + sum(len(x[0]) for x in left) == 24 and left  # nothing lost
    assert all(x[2] == 1 for x in left)
    with pytest.raises(ValueError, match="exceeds the rows"):
        p.pack([(np.arange(11), np.array([1]), 0)])


def test_too_few_documents_for_readers(data_dir, tok):
    ds = TokenDataset(data_dir, "val")
    it = UL2Batches(ds, tok, enc_len=64, dec_len=64, world_size=len(ds) + 1, rank=0)
    with pytest.raises(ValueError, match="fewer than its"):
        next(iter(it))


def _assemble_rowwise(rows, B, E, D):
    # The batch format written one example at a time (the spec for Packer.assemble's scatter).
    ids, seg = np.zeros((B, E), np.int64), np.zeros((B, E), np.int64)
    dec, lab, dseg = np.zeros((B, D), np.int64), np.full((B, D), -100), np.zeros((B, D), np.int64)
    for r, row in enumerate(rows):
        pe = pd = 0
        for k, (inp, tgt, _) in enumerate(row, 1):
            ids[r, pe : pe + len(inp)], seg[r, pe : pe + len(inp)] = inp, k
            lab[r, pd : pd + len(tgt)], dseg[r, pd : pd + len(tgt)] = tgt, k
            dec[r, pd], dec[r, pd + 1 : pd + len(tgt)] = 0, tgt[:-1]
            pe, pd = pe + len(inp), pd + len(tgt)
    return ids, seg, dec, lab, dseg


def test_assemble_matches_rowwise():
    rng = np.random.default_rng(0)
    B, E, D = 5, 40, 17
    for _ in range(50):
        rows = [[] for _ in range(B)]
        for r in rng.permutation(B)[: int(rng.integers(0, B + 1))]:  # some rows stay empty
            fe, fd = E, D
            while fe >= 1 and fd >= 1 and rng.random() < 0.8:
                ne, nd = int(rng.integers(1, fe + 1)), int(rng.integers(1, fd + 1))
                rows[r].append((rng.integers(3, 99, ne), rng.integers(3, 99, nd), 0))
                fe, fd = fe - ne, fd - nd
        b = Packer(B, E, D).assemble(rows)
        ids, seg, dec, lab, dseg = _assemble_rowwise(rows, B, E, D)
        assert np.array_equal(b["input_ids"], ids) and np.array_equal(b["segment_ids"], seg)
        assert np.array_equal(b["decoder_input_ids"], dec) and np.array_equal(b["labels"], lab)
        assert np.array_equal(b["decoder_segment_ids"], dseg)
        assert np.array_equal(b["attention_mask"], seg > 0)
        assert np.array_equal(b["decoder_attention_mask"], dseg > 0)


def test_state_dict_is_a_snapshot(data_dir, tok):
    it = _stream(data_dir, tok)
    gen = iter(it)
    for _ in range(3):
        next(gen)
    state = it.state_dict()
    frozen = json.loads(json.dumps(state))
    for _ in range(3):  # the live stream moves on (and reuses its carried-over list); the snapshot must not
        next(gen)
    assert json.loads(json.dumps(state)) == frozen
    assert it.state_dict()["streams"] != frozen["streams"]


def test_default_pieces_leave_little_encoder_padding(data_dir, tok):
    # With pieces of at most half a row (the default), input-heavy and target-heavy pieces share rows.
    low = _stream(data_dir, tok, enc_len=256, dec_len=256, batch_size=8)
    full = _stream(data_dir, tok, enc_len=256, dec_len=256, batch_size=8, max_piece_fraction=1.0)
    for it in (low, full):
        for i, _ in enumerate(it):
            if i == 100:
                break
    assert low.padding()[0] < 0.02 < full.padding()[0]
    # decoder padding is the mixture's: targets hold about half as many tokens as inputs
    assert 0.4 < low.padding()[1] < 0.6
