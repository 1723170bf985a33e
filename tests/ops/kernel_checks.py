"""Shared by the kernel tests: NaN-poisoned allocations and DESIGN.md's low-precision error rule."""

import pytest


@pytest.fixture(autouse=True)
def _poison_empty():
    import torch

    # deterministic mode fills torch.empty with NaN: any element a kernel forgets to write shows up
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(prev)


def _assert_within(name, got, ref_lp, ref64, factor, floor):
    """The kernel's max error vs float64 is at most ``factor`` x the reference's own error at the same
    precision, plus ``floor`` relative to the largest reference value."""
    err = (got.double() - ref64).abs().max().item()
    ref_err = (ref_lp.double() - ref64).abs().max().item()
    bound = factor * ref_err + floor * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e} (reference's own error {ref_err:.3e})"


def zero_fills(fn) -> list[str]:
    """The aten ops that fill memory with a constant (zeros, fill, full) while ``fn()`` runs: a backward should
    run none for gradients nobody asked for (each is a kernel launch on the GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        names: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        fn()
    return [n for n in ops.names if any(f in n for f in ("zero", "fill", "full"))]
