"""Registration of a Triton op as a (forward, backward) pair of torch.library custom ops, plus an eager twin.

The custom ops (schemas inferred from the implementations' annotations, fake kernels, a registered backward)
keep ``torch.compile`` graphs whole. In eager mode their dispatch layer costs host time on every call (about
50 us per forward+backward with a trivial body on a 2-core server CPU; benchmarks/host_overhead.py measures
it on real ops), which short kernels cannot hide. So eager calls run the same implementations through a plain ``torch.autograd.Function``
with the same context setup and backward rule; the returned callable picks the path.

Gradients are not materialised: the rule gets None for an output whose gradient nobody produced (an unused
statistic, a logging term), and must treat it as zero.
Limits: the backward rule receives the backward implementation as ``bwd`` and must call only that.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# benchmarks/host_overhead.py sets this to time the custom-op dispatch in eager mode against the twin
FORCE_CUSTOM_OPS = False


def op_pair(
    name: str,
    fwd_impl: Callable,
    fwd_fake: Callable,
    bwd_impl: Callable,
    bwd_fake: Callable,
    setup_context: Callable,
    backward: Callable,
) -> tuple[Callable, Callable, Callable]:
    """Register ``fat5::<name>_fwd`` / ``fat5::<name>_bwd``; ``backward(ctx, *grads, bwd=...)`` is the rule.

    Returns (call, fwd_op, bwd_op): ``call(*inputs)`` runs the custom op under torch.compile and the eager
    autograd.Function otherwise; both give the same outputs and gradients."""
    fwd_op = torch.library.custom_op(f"fat5::{name}_fwd", mutates_args=())(fwd_impl)
    bwd_op = torch.library.custom_op(f"fat5::{name}_bwd", mutates_args=())(bwd_impl)
    fwd_op.register_fake(fwd_fake)
    bwd_op.register_fake(bwd_fake)

    def setup(ctx, inputs, output):
        # gradients of outputs nobody used (saved statistics, logging terms, empty placeholders) reach the rule
        # as None: materialised, each would be a zero-filled tensor, one fill kernel per backward call
        ctx.set_materialize_grads(False)
        setup_context(ctx, inputs, output)

    fwd_op.register_autograd(lambda ctx, *grads: backward(ctx, *grads, bwd=bwd_op), setup_context=setup)

    def forward(ctx, *inputs):
        output = fwd_impl(*inputs)
        setup(ctx, inputs, output)
        return output

    def eager_backward(ctx, *grads):
        return backward(ctx, *grads, bwd=bwd_impl)

    eager = type(
        f"Eager_{name}",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(eager_backward)},
    )

    def call(*inputs):
        return (fwd_op if FORCE_CUSTOM_OPS or torch.compiler.is_compiling() else eager.apply)(*inputs)

    return call, fwd_op, bwd_op
