"""Helpers for the data tests: undo a denoising, and split a packed batch back into examples."""

import numpy as np


def reconstruct(inputs, targets, sentinels, mode_ids, eos=1):
    """The original piece from (inputs, targets): sentinels in the inputs are replaced by their spans."""
    inputs, targets = list(inputs), list(targets)
    assert inputs[-1] == eos and targets[-1] == eos
    inputs, targets = inputs[:-1], targets[:-1]
    if inputs and inputs[0] in mode_ids:
        inputs = inputs[1:]
    sent = {s: i for i, s in enumerate(sentinels)}
    if not any(t in sent for t in inputs):  # prefix LM
        return inputs + targets
    spans, cur = {}, None
    for t in targets:
        if t in sent:
            cur = sent[t]
            assert cur not in spans
            spans[cur] = []
        else:
            spans[cur].append(t)
    out, used = [], []
    for t in inputs:
        if t in sent:
            out += spans[sent[t]]
            used.append(sent[t])
        else:
            out.append(t)
    assert used == list(range(len(spans))), "sentinels must be numbered 0, 1, ... in order"
    return out


def unpack(batch):
    """[(inputs, targets)] of every packed example in a batch (numpy), checking the row invariants."""
    b = {k: v.numpy() for k, v in batch.items()}
    out = []
    for r in range(b["input_ids"].shape[0]):
        seg, dseg = b["segment_ids"][r], b["decoder_segment_ids"][r]
        assert (b["attention_mask"][r] == (seg > 0)).all()
        assert (b["decoder_attention_mask"][r] == (dseg > 0)).all()
        assert ((b["labels"][r] == -100) == (dseg == 0)).all()
        assert ((b["input_ids"][r] == 0) | (seg > 0)).all()
        k = int(seg.max())
        assert int(dseg.max()) == k
        # segments are contiguous runs 1..k followed by padding, identically ordered in encoder and decoder
        for s in (seg, dseg):
            nz = s[s > 0]
            assert (np.diff(nz) >= 0).all() and (nz[0] == 1 if k else True)
            assert (s[len(nz) :] == 0).all()
            assert set(nz.tolist()) == set(range(1, k + 1))
        for j in range(1, k + 1):
            inp = b["input_ids"][r][seg == j]
            lab = b["labels"][r][dseg == j]
            dec = b["decoder_input_ids"][r][dseg == j]
            assert dec[0] == 0 and (dec[1:] == lab[:-1]).all()
            out.append((inp, lab))
    return out
