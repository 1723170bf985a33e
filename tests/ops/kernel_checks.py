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
