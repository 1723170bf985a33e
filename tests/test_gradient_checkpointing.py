"""Gradient checkpointing through transformers' ``gradient_checkpointing_enable()``: identical fp32 gradients,
recomputed blocks, and less activation memory.

Memory is measured by what autograd keeps for the backward pass: every tensor saved during the forward goes
through a ``torch.autograd.graph.saved_tensors_hooks`` pack hook, and we sum the bytes of the distinct
storages. That is deterministic on CPU (allocator-independent), unlike timing or RSS. Checkpointed blocks save
no tensors in the forward (torch's non-reentrant checkpoint keeps its own hooks innermost), so the sum must
drop by about the per-layer activations.
"""

import pytest
import torch

from fat5 import FAT5Config, FAT5ForConditionalGeneration
from fat5.heads import FAT5ForSequenceClassification
from fat5.model import Block

V = 128


def tiny(**kw) -> FAT5Config:
    base = dict(
        vocab_size=V,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_heads=4,
        num_layers=4,
        num_decoder_layers=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        num_labels=3,
    )
    return FAT5Config.from_preset("tiny", **{**base, **kw})


def inputs(model, b=2, m=48):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, V, (b, m), generator=g)
    mask = torch.ones_like(ids)
    mask[1, m // 2 :] = 0
    if isinstance(model, FAT5ForConditionalGeneration):
        labels = torch.randint(2, V, (b, m // 2), generator=g)
    else:
        labels = torch.randint(0, 3, (b,), generator=g)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def grads(model, batch, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks in both runs (checkpoint replays the RNG state)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def saved_bytes(model, batch) -> int:
    storages = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)  # activations only


MODELS = [FAT5ForConditionalGeneration, FAT5ForSequenceClassification]


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}], ids=["non-reentrant", "reentrant"])
def test_same_gradients(cls, dropout, kwargs):
    torch.manual_seed(0)
    model = cls(tiny(dropout_rate=dropout)).train()
    batch = inputs(model)
    loss_ref, ref = grads(model, batch)
    assert not model.is_gradient_checkpointing

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert model.is_gradient_checkpointing
    calls = []
    hooks = [
        m.register_forward_pre_hook(lambda *a: calls.append(1))
        for m in model.modules()
        if isinstance(m, Block)
    ]
    loss_ckpt, got = grads(model, batch)
    n_blocks = len(hooks)
    for h in hooks:
        h.remove()
    assert len(calls) == 2 * n_blocks, "each block runs again in the backward pass"

    torch.testing.assert_close(loss_ckpt, loss_ref, rtol=0, atol=1e-6)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(
            got[name], ref[name], rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )

    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_less_saved_activation_memory(cls):
    torch.manual_seed(0)
    model = cls(tiny()).train()
    batch = inputs(model, b=4, m=64)
    plain = saved_bytes(model, batch)
    model.gradient_checkpointing_enable()
    ckpt = saved_bytes(model, batch)
    # 4 (+4) blocks hold most of the activations; only embeddings, final norms and the head remain
    assert ckpt < 0.5 * plain, f"saved activations: {plain} B without checkpointing, {ckpt} B with"


def test_eval_mode_does_not_checkpoint():
    model = FAT5ForSequenceClassification(tiny()).eval()
    model.gradient_checkpointing_enable()
    calls = []
    hooks = [
        m.register_forward_pre_hook(lambda *a: calls.append(1))
        for m in model.modules()
        if isinstance(m, Block)
    ]
    with torch.no_grad():
        model(**{k: v for k, v in inputs(model).items() if k != "labels"})
    for h in hooks:
        h.remove()
    assert len(calls) == len(hooks)
