"""Each Triton op runs eagerly through an autograd.Function and under torch.compile through its torch.library
custom ops (ops/registration.py): both paths must give bitwise the same outputs and gradients, and the compiled
graph must hold the custom op (no graph break, no fallback to the eager twin). CPU: the kernels run in the
Triton interpreter; the compiled graph runs with the aot_eager backend (fake kernels + registered backward)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager

from fat5.ops.activations import gated_act_triton
from fat5.ops.cross_entropy import cross_entropy_triton
from fat5.ops.rmsnorm import rms_norm_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rms(x, w, r):
    y, h = rms_norm_triton(x, w, 1e-6, residual=r)
    return y.sum() * 0.5 + (h * h).mean()


def _act(g, u):
    return (gated_act_triton(g, u, "gelu_tanh") ** 2).sum()


def _ce(logits, labels):
    loss, z = cross_entropy_triton(logits, labels, z_loss=1e-3, label_smoothing=0.1)
    return loss + 0 * z


CASES = {
    "rms_norm": (
        _rms,
        lambda g: (
            torch.randn(7, 48, generator=g),
            1 + 0.1 * torch.randn(48, generator=g),
            torch.randn(7, 48, generator=g),
        ),
        "rms_norm_fwd",
    ),
    "gated_act": (
        _act,
        lambda g: (torch.randn(5, 33, generator=g), torch.randn(5, 33, generator=g)),
        "gated_act_fwd",
    ),
    "cross_entropy": (
        _ce,
        lambda g: (torch.randn(6, 101, generator=g), torch.tensor([3, -100, 0, 100, 7, -100])),
        "cross_entropy_fwd",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_eager_twin_equals_custom_op(name):
    fn, make, op = CASES[name]
    gen = torch.Generator().manual_seed(0)
    inputs = [t.to(DEV) for t in make(gen)]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    results = []
    for f in (fn, torch.compile(fn, backend=backend, fullgraph=True)):
        args = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = f(*args)
        grads = torch.autograd.grad(out, [a for a in args if a.requires_grad])
        results.append((out, *grads))
    for x, y in zip(*results):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes}
    assert f"fat5.{op}.default" in targets, targets
