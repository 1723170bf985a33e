"""The whole model on the Triton kernels (interpreter on CPU) equals the reference path: loss and every gradient."""

import pytest
import torch

from fat5 import FAT5Config, FAT5ForConditionalGeneration, ops
from fat5.model import RMSNorm


@pytest.fixture
def restore_backend():
    yield
    ops.set_backend("auto")


def run(model, batch, backend):
    ops.set_backend(backend)
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("pe", ["t5", "alibi", "fire"])
def test_kernels_match_reference(restore_backend, pe):
    cfg = FAT5Config.from_preset(
        "tiny",
        vocab_size=131,
        d_model=32,
        d_kv=16,
        d_ff=40,
        num_heads=2,
        num_layers=1,
        num_decoder_layers=1,
        position_encoding=pe,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        z_loss=1e-3,
    )
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(cfg).train()
    ids = torch.randint(2, 131, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = torch.randint(2, 131, (2, 7))
    labels[1, 5:] = -100
    batch = dict(
        input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=(labels != -100).long()
    )
    loss_ref, g_ref = run(model, batch, "reference")
    loss_k, g_k = run(model, batch, "triton")
    assert abs(loss_ref.item() - loss_k.item()) < 1e-5 * abs(loss_ref.item())
    for n, g in g_ref.items():
        # floor: gradients that are exactly zero in theory (e.g. a per-head constant bias under softmax)
        err = (g_k[n] - g).abs().max() / g.abs().max().clamp(min=1e-3)
        assert err < 1e-4, (n, err.item())


def _autocast_batch():
    ids = torch.randint(2, 131, (2, 13))
    labels = torch.randint(2, 131, (2, 7))
    labels[1, 5:] = -100
    return dict(input_ids=ids, labels=labels, decoder_attention_mask=(labels != -100).long())


def _tiny_model():
    cfg = FAT5Config.from_preset(
        "tiny", vocab_size=131, d_model=32, d_kv=16, d_ff=40, num_heads=2, num_layers=2, num_decoder_layers=2
    )
    torch.manual_seed(0)
    return FAT5ForConditionalGeneration(cfg).train()


def test_autocast_norms_feed_linears_in_low_precision(restore_backend, monkeypatch):
    # under autocast the in-block norms write their output in the autocast dtype; the final norms and the fp32
    # residual stream stay fp32. Loss and gradients equal those of fp32 norm outputs cast by the linear layers.
    model, batch = _tiny_model(), _autocast_batch()
    seen = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o if torch.is_tensor(o) else o[0]))
        for n, m in model.named_modules()
        if n.endswith("_norm")
    ]
    ops.set_backend("reference")
    with torch.autocast("cpu", dtype=torch.float16):
        loss, grads = run(model, batch, "reference")
    for h in hooks:
        h.remove()
    for n, out in seen.items():
        want = torch.float32 if n.endswith("final_norm") else torch.float16
        assert out.dtype == want, (n, out.dtype)
    monkeypatch.setattr(RMSNorm, "low_precision_out", False)
    with torch.autocast("cpu", dtype=torch.float16):
        loss_cast, grads_cast = run(model, batch, "reference")
    assert loss.item() == loss_cast.item()
    for n, g in grads.items():
        torch.testing.assert_close(g, grads_cast[n], rtol=0, atol=0, msg=n)


def test_kernels_match_reference_under_autocast(restore_backend):
    # mixed dtypes through the kernels: fp16 layer outputs onto the fp32 residual stream, fp16 norm outputs
    model, batch = _tiny_model(), _autocast_batch()
    with torch.autocast("cpu", dtype=torch.float16):
        loss_ref, g_ref = run(model, batch, "reference")
        loss_k, g_k = run(model, batch, "triton")
    assert abs(loss_ref.item() - loss_k.item()) < 2e-3 * abs(loss_ref.item())
    for n, g in g_ref.items():
        err = (g_k[n] - g).abs().max() / g.abs().max().clamp(min=1e-3)
        assert err < 2e-2, (n, err.item())
