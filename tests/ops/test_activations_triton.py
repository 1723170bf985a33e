"""gated_act_triton against gated_act_ref: values and both gradients, every activation, gated and not.

Error rule (DESIGN.md): in low precision the kernel's max error against the float64 reference is at most
2x (values) / 3x (gradients) the reference's own error at that precision, plus a tiny floor.
"""

import pytest
import torch
from kernel_checks import _assert_within, _poison_empty  # noqa: F401  (autouse fixture)

from fat5.ops.activations import (
    ACTIVATIONS,
    gated_act_packed_ref,
    gated_act_packed_triton,
    gated_act_ref,
    gated_act_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the CPU interpreter evaluates sigmoid with numpy, which warns when exp(-x) overflows to inf (result still 0/1)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _run(fn, gate, up, act, dout):
    g = gate.detach().clone().requires_grad_()
    u = up.detach().clone().requires_grad_() if up is not None else None
    out = fn(g, u, act)
    grads = torch.autograd.grad(out, [g] + ([u] if u is not None else []), dout.to(out.dtype))
    return out, grads


def _check(shape, act, gated, dtype, device=DEVICE):
    gate = (torch.randn(shape, device=device) * 3).to(dtype)  # wide enough to reach gelu's tails
    up = torch.randn(shape, device=device).to(dtype) if gated else None
    dout = torch.randn(shape, device=device).to(dtype)
    out, grads = _run(gated_act_triton, gate, up, act, dout)
    out_lp, grads_lp = _run(gated_act_ref, gate, up, act, dout)
    out64, grads64 = _run(gated_act_ref, gate.double(), up.double() if gated else None, act, dout.double())
    assert out.dtype == dtype and out.shape == gate.shape
    floor = 1e-5 if dtype == torch.float32 else 1e-6
    _assert_within("out", out, out_lp, out64, 2, floor)
    for name, g, g_lp, g64 in zip(("dgate", "dup"), grads, grads_lp, grads64):
        assert g.dtype == dtype
        _assert_within(name, g, g_lp, g64, 3, floor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1,), (127, 37), (3, 2, 1030)])
def test_matches_reference(shape, act, gated, dtype):
    _check(shape, act, gated, dtype)


def _check_packed(shape, act, dtype, device=DEVICE):
    gu = (torch.randn(shape, device=device) * 3).to(dtype)
    dout = torch.randn(shape[:-1] + (shape[-1] // 2,), device=device).to(dtype)

    def run(fn, gu, dout):
        gu = gu.detach().clone().requires_grad_()
        out = fn(gu, act)
        return out, torch.autograd.grad(out, gu, dout.to(out.dtype))[0]

    out, dgu = run(gated_act_packed_triton, gu, dout)
    out_lp, dgu_lp = run(gated_act_packed_ref, gu, dout)
    out64, dgu64 = run(gated_act_packed_ref, gu.double(), dout.double())
    # the packed op is the separate op on the two halves: an independent float64 check of the split too
    half = shape[-1] // 2
    sep64 = gated_act_ref(gu.double()[..., :half], gu.double()[..., half:], act)
    torch.testing.assert_close(out64, sep64, rtol=0, atol=0)
    assert out.dtype == dgu.dtype == dtype and out.shape == dout.shape and dgu.shape == gu.shape
    floor = 1e-5 if dtype == torch.float32 else 1e-6
    _assert_within("out", out, out_lp, out64, 2, floor)
    _assert_within("dgu", dgu, dgu_lp, dgu64, 3, floor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(2,), (127, 74), (3, 2, 2060)])
def test_packed_matches_reference(shape, act, dtype):
    _check_packed(shape, act, dtype)


def test_packed_bad_input():
    with pytest.raises(ValueError, match="must be even"):
        gated_act_packed_triton(torch.randn(4, 7, device=DEVICE), "silu")
    with pytest.raises(ValueError, match="unknown activation"):
        gated_act_packed_triton(torch.randn(4, 8, device=DEVICE), "swish")


def test_packed_registration_and_compile():
    gu = torch.randn(5, 2 * 19, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.fat5.gated_act_packed_fwd, (gu, "gelu_tanh"))
    fn = torch.compile(
        lambda t: gated_act_packed_triton(t, "gelu_tanh") * 2, backend="aot_eager", fullgraph=True
    )
    fn(gu).sum().backward()
    ref = gu.detach().requires_grad_()
    (gated_act_packed_ref(ref, "gelu_tanh") * 2).sum().backward()
    torch.testing.assert_close(gu.grad, ref.grad)


def test_non_contiguous_inputs():
    # gate/up as the two halves of one fused projection: strided views
    both = torch.randn(7, 2 * 33, device=DEVICE, requires_grad=True)
    gate, up = both.chunk(2, dim=-1)
    out = gated_act_triton(gate, up, "gelu_tanh")
    out.sum().backward()
    grad = both.grad.clone()
    both.grad = None
    gated_act_ref(gate, up, "gelu_tanh").sum().backward()
    torch.testing.assert_close(out, gated_act_ref(gate, up, "gelu_tanh"))
    torch.testing.assert_close(grad, both.grad)


def test_empty():
    gate = torch.randn(0, 5, device=DEVICE, requires_grad=True)
    out = gated_act_triton(gate, None, "silu")
    out.sum().backward()
    assert out.shape == (0, 5) and gate.grad.shape == (0, 5)


def test_bad_input():
    g = torch.randn(4, device=DEVICE)
    with pytest.raises(ValueError, match="unknown activation"):
        gated_act_triton(g, None, "swish")
    with pytest.raises(ValueError, match="must match gate"):
        gated_act_triton(g, torch.randn(5, device=DEVICE), "relu")


def test_torch_library_registration():
    gate, up = torch.randn(3, 9, device=DEVICE), torch.randn(3, 9, device=DEVICE)
    torch.library.opcheck(torch.ops.fat5.gated_act_fwd, (gate.requires_grad_(), up, "gelu"))
    torch.library.opcheck(torch.ops.fat5.gated_act_fwd, (gate, None, "silu"))


def test_compiles_without_graph_break():
    gate = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    up = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    fn = torch.compile(
        lambda g, u: gated_act_triton(g, u, "gelu_tanh") * 2, backend="aot_eager", fullgraph=True
    )
    fn(gate, up).sum().backward()
    ref_gate, ref_up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    (gated_act_ref(ref_gate, ref_up, "gelu_tanh") * 2).sum().backward()
    torch.testing.assert_close(gate.grad, ref_gate.grad)
    torch.testing.assert_close(up.grad, ref_up.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_bf16_gpu(act, gated):
    _check((1000, 2051), act, gated, torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_packed_bf16_gpu(act):
    _check_packed((1000, 2 * 2051), act, torch.bfloat16, device="cuda")


@pytest.mark.gpu
def test_inductor_gpu():
    gate = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn_like(gate, requires_grad=True)
    fn = torch.compile(lambda g, u: gated_act_triton(g, u, "gelu_tanh") + 1, fullgraph=True)
    fn(gate, up).float().sum().backward()
    ref_gate, ref_up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    gated_act_triton(ref_gate, ref_up, "gelu_tanh").float().sum().backward()
    torch.testing.assert_close(gate.grad, ref_gate.grad)
    torch.testing.assert_close(up.grad, ref_up.grad)
