"""cross_entropy_triton and linear_cross_entropy_triton against their references: loss, z-term and gradients.

Awkward cases: vocab 32101 (not a multiple of the block), one token, all tokens ignored, several token chunks,
tied input/output embedding with T5 v1.0 rescaling. Error rule (DESIGN.md): in low precision the kernel's max
error against the float64 reference is at most 2x (values) / 3x (gradients) the reference's own error at that
precision, plus a small floor.
"""

import importlib

import pytest
import torch
from kernel_checks import _assert_within, _poison_empty, zero_fills  # noqa: F401  (autouse fixture)

ce = importlib.import_module("fat5.ops.cross_entropy")  # fat5.ops.cross_entropy is also a function name

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _labels(t, v, n_ignored, device):
    labels = torch.randint(0, v, (t,), device=device)
    labels[torch.randperm(t, device=device)[:n_ignored]] = -100
    return labels


# ---- cross_entropy_triton on given logits ----


def _run_ce(fn, logits, labels, grad_scale, **kw):
    logits = logits.detach().clone().requires_grad_()
    loss, z = fn(logits, labels, **kw)
    (grad,) = torch.autograd.grad(loss * grad_scale, [logits])
    return loss, z, grad


def _check_ce(t, v, n_ignored, dtype, device=DEVICE, **kw):
    logits = (torch.randn(t, v, device=device) * 4).to(dtype)
    labels = _labels(t, v, n_ignored, device)
    loss, z, grad = _run_ce(ce.cross_entropy_triton, logits, labels, 3.0, **kw)
    loss_lp, z_lp, grad_lp = _run_ce(ce.cross_entropy_ref, logits, labels, 3.0, **kw)
    loss64, z64, grad64 = _run_ce(ce.cross_entropy_ref, logits.double(), labels, 3.0, **kw)
    assert grad.dtype == dtype
    # the reference upcasts logits to fp32, so at any input dtype its own loss error can be ~0: the floor is fp32's
    floor = 1e-5
    _assert_within("loss", loss, loss_lp, loss64, 2, floor)
    _assert_within("z_term", z, z_lp, z64, 2, floor)
    _assert_within("dlogits", grad, grad_lp, grad64, 3, floor)
    return loss, grad


OPTIONS = [dict(), dict(z_loss=1e-3), dict(label_smoothing=0.1), dict(z_loss=1e-2, label_smoothing=0.2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kw", OPTIONS)
@pytest.mark.parametrize("t,v,n_ignored", [(1, 32101, 0), (4, 32101, 1), (37, 100, 9)])
def test_ce_matches_reference(t, v, n_ignored, kw, dtype):
    _check_ce(t, v, n_ignored, dtype, **kw)


def test_ce_all_ignored_is_zero():
    loss, grad = _check_ce(5, 77, 5, torch.float32, z_loss=1e-3, label_smoothing=0.1)
    assert loss.item() == 0.0 and not grad.any()


def test_ce_bad_label_gives_nan_not_a_sync():
    logits = torch.randn(3, 10, device=DEVICE)
    loss, _ = ce.cross_entropy_triton(logits, torch.tensor([1, 10, -100], device=DEVICE))
    assert loss.isnan()


def test_ce_z_term_is_not_differentiable():
    logits = torch.randn(3, 10, device=DEVICE, requires_grad=True)
    loss, z = ce.cross_entropy_triton(logits, torch.tensor([1, 2, 3], device=DEVICE), z_loss=1e-3)
    assert loss.requires_grad and not z.requires_grad


def test_ce_torch_library_registration():
    logits = torch.randn(6, 50, device=DEVICE, requires_grad=True)
    labels = torch.tensor([1, -100, 49, 0, 7, 7], device=DEVICE)
    torch.library.opcheck(torch.ops.fat5.cross_entropy_fwd, (logits, labels, -100, 1e-3, 0.1))


# ---- linear_cross_entropy_triton ----


def _run_lce(fn, hidden, weight, labels, grad_scale, **kw):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss, z = fn(hidden, weight, labels, **kw)
    grads = torch.autograd.grad(loss * grad_scale, [hidden, weight])
    return (loss, z), grads


def _check_lce(t, d, v, n_ignored, dtype, device=DEVICE, **kw):
    hidden = torch.randn(t, d, device=device).to(dtype)
    weight = (torch.randn(v, d, device=device) * 2 / d**0.5).to(dtype)
    labels = _labels(t, v, n_ignored, device)
    vals, grads = _run_lce(ce.linear_cross_entropy_triton, hidden, weight, labels, 2.0, **kw)
    vals_lp, grads_lp = _run_lce(ce.linear_cross_entropy_ref, hidden, weight, labels, 2.0, **kw)
    vals64, grads64 = _run_lce(
        ce.linear_cross_entropy_ref, hidden.double(), weight.double(), labels, 2.0, **kw
    )
    floor = 1e-5  # softmax math is fp32 in both, whatever the input dtype
    for name, a, a_lp, a64 in zip(("loss", "z_term"), vals, vals_lp, vals64):
        _assert_within(name, a, a_lp, a64, 2, floor)
    for name, g, g_lp, g64 in zip(("dhidden", "dweight"), grads, grads_lp, grads64):
        assert g.dtype == dtype
        _assert_within(name, g, g_lp, g64, 3, floor)
    return vals, grads


@pytest.fixture
def small_chunks(monkeypatch):
    # 2 * 32101 logits a chunk: 2 tokens at vocab 32101, 1024 at vocab 100, so several chunks run
    monkeypatch.setattr(ce, "_CHUNK_ELEMENTS", 2 * 32101)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kw", [dict(), dict(z_loss=1e-3, label_smoothing=0.1)])
@pytest.mark.parametrize("t,d,v,n_ignored", [(1, 16, 32101, 0), (5, 24, 32101, 2)])
def test_lce_matches_reference(t, d, v, n_ignored, kw, dtype, small_chunks):
    _check_lce(t, d, v, n_ignored, dtype, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lce_many_tokens_small_vocab(dtype, monkeypatch):
    monkeypatch.setattr(ce, "_CHUNK_ELEMENTS", 64 * 100)  # 64 tokens a chunk: 3 chunks, the last one short
    _check_lce(150, 32, 100, 20, dtype, z_loss=1e-3)


def test_lce_all_ignored_is_zero(small_chunks):
    (loss, z), (dh, dw) = _check_lce(3, 8, 32101, 3, torch.float32, z_loss=1e-3)
    assert loss.item() == 0.0 and z.item() == 0.0 and not dh.any() and not dw.any()


def test_lce_tied_embedding_t5_v1_0(small_chunks):
    # the shared embedding is both the input table and the output projection (rescaled by d**-0.5 by the caller)
    v, d, t = 32101, 16, 4
    table = torch.randn(v, d, device=DEVICE) * 0.5
    ids = torch.randint(0, v, (t,), device=DEVICE)
    labels = _labels(t, v, 1, DEVICE)

    def run(fn, table):
        table = table.detach().clone().requires_grad_()
        hidden = torch.tanh(table[ids]) * d**-0.5
        loss, _ = fn(hidden, table, labels, z_loss=1e-4)
        (grad,) = torch.autograd.grad(loss, [table])
        return loss, grad

    loss, grad = run(ce.linear_cross_entropy_triton, table)
    loss64, grad64 = run(ce.linear_cross_entropy_ref, table.double())
    torch.testing.assert_close(loss.double(), loss64.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), grad64, atol=1e-6, rtol=1e-4)


def test_lce_only_hidden_needs_grad_and_no_grad_mode():
    hidden = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(50, 8, device=DEVICE)
    labels = _labels(6, 50, 1, DEVICE)
    loss, _ = ce.linear_cross_entropy_triton(hidden, weight, labels)
    loss.backward()
    ref_hidden = hidden.detach().requires_grad_()
    ce.linear_cross_entropy_ref(ref_hidden, weight, labels)[0].backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad)
    with torch.no_grad():
        loss_ng, _ = ce.linear_cross_entropy_triton(hidden, weight, labels)
    torch.testing.assert_close(loss_ng, loss.detach())


def test_lce_backward_fills_no_zero_gradients():
    # the held gradients are outputs (non-differentiable): materialised, their unused gradients would be zero
    # fills as large as the hidden states and the fp32 embedding gradient on every backward
    hidden = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 40, (6,), device=DEVICE)
    loss, _ = ce.linear_cross_entropy_triton(hidden, weight, labels, z_loss=1e-3)
    fills = zero_fills(lambda: torch.autograd.grad(loss, (hidden, weight)))
    assert not fills, fills


def test_lce_bad_input():
    h, w = torch.randn(4, 8, device=DEVICE), torch.randn(20, 8, device=DEVICE)
    with pytest.raises(ValueError, match="hidden must be"):
        ce.linear_cross_entropy_triton(h, torch.randn(20, 9, device=DEVICE), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be"):
        ce.linear_cross_entropy_triton(h, w, torch.zeros(5, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="share a dtype"):
        ce.linear_cross_entropy_triton(h.half(), w, torch.zeros(4, dtype=torch.long, device=DEVICE))


def test_lce_torch_library_registration_and_compile():
    h = torch.randn(7, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    labels = _labels(7, 40, 2, DEVICE)
    torch.library.opcheck(
        torch.ops.fat5.linear_cross_entropy_fwd, (h, w, labels, -100, 1e-3, 0.1, True, True)
    )
    fn = torch.compile(
        lambda h, w: ce.linear_cross_entropy_triton(h * 2, w, labels, z_loss=1e-3)[0],
        backend="aot_eager",
        fullgraph=True,
    )
    fn(h, w).backward()
    refs = [t.detach().requires_grad_() for t in (h, w)]
    ce.linear_cross_entropy_ref(refs[0] * 2, refs[1], labels, z_loss=1e-3)[0].backward()
    torch.testing.assert_close(h.grad, refs[0].grad)
    torch.testing.assert_close(w.grad, refs[1].grad)


# ---- bf16 on the GPU ----


@pytest.mark.gpu
@pytest.mark.parametrize("kw", OPTIONS)
def test_ce_bf16_gpu(kw):
    _check_ce(300, 32101, 40, torch.bfloat16, device="cuda", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(), dict(z_loss=1e-4, label_smoothing=0.1)])
def test_lce_bf16_gpu(kw, monkeypatch):
    monkeypatch.setattr(
        ce, "_CHUNK_ELEMENTS", 512 * 32101
    )  # 512 tokens a chunk: 4 chunks, the last one short
    _check_lce(1800, 256, 32101, 100, torch.bfloat16, device="cuda", **kw)
