"""ops/launch.py: the memoised launch path. On CPU, its key against Triton's own specialisation rules; on the
GPU, bitwise equality with the ordinary launch path for every op that uses it, re-specialisation on a
misaligned argument, and that repeated calls are served from the memo."""

import pytest
import torch
import triton
import triton.language as tl
from triton.backends.compiler import BaseBackend

from fat5.ops import launch
from fat5.ops.launch import Launcher


@triton.jit
def _axpy(X, Y, OUT, n, a, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask)
    y = tl.load(Y + offs, mask=mask)
    tl.store(OUT + offs, a * x + y, mask=mask)


def _key(args, kwargs=None):
    lau = Launcher(_axpy)
    lau.backends[0] = BaseBackend
    return lau._key(0, args, kwargs or {"BLOCK": 64})


def test_key_follows_triton_specialisation():
    base = torch.zeros(64)
    aligned, misaligned = base[4:], base[1:]  # 16 and 4 bytes past an aligned address
    n16, n17 = 16, 17
    k = _key((aligned, aligned, aligned, n16, 2.0))
    assert k == _key(
        (base[8:], base, base[4:], 32, 3.0)
    )  # same specialisation: same entry, floats unspecialised
    assert k != _key((misaligned, aligned, aligned, n16, 2.0))  # alignment of a pointer
    assert k != _key((aligned, aligned, aligned, n17, 2.0))  # divisibility by 16
    assert k != _key((aligned, aligned, aligned, 1, 2.0))  # an int equal to 1 is a constexpr
    assert k != _key((aligned, aligned, aligned, 2**33, 2.0))  # 64-bit int
    assert k != _key((aligned.half(), aligned, aligned, n16, 2.0))  # dtype
    assert k != _key((aligned, aligned, aligned, n16, 2.0), {"BLOCK": 128})  # constexpr value


def test_key_includes_autotune_keys_and_extra():
    tuned = triton.autotune(configs=[triton.Config({"BLOCK": 64})], key=["n"])(_axpy)
    state = {"v": 1}
    lau = Launcher(tuned, extra=lambda: state["v"])
    lau.backends[0] = BaseBackend
    x = torch.zeros(64)
    k = lau._key(0, (x, x, x, 16, 1.0), {})
    assert k != lau._key(0, (x, x, x, 32, 1.0), {})  # n is an autotune key: its value counts
    state["v"] = 2
    assert k != lau._key(0, (x, x, x, 16, 1.0), {})


def test_interpreter_takes_the_ordinary_path():
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs under the CPU interpreter")
    assert not launch.ENABLED
    x, y = torch.randn(100), torch.randn(100)
    out = torch.empty(100)
    lau = Launcher(_axpy)
    lau[(2,)](x, y, out, 100, 3.0, BLOCK=64)
    torch.testing.assert_close(out, 3.0 * x + y, rtol=0, atol=0)
    assert not lau.entries


# ------------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu


@gpu
def test_memoised_launch_is_the_ordinary_launch_gpu():
    x = torch.randn(1000, device="cuda")
    y = torch.randn(1000, device="cuda")
    lau = Launcher(_axpy)
    outs = []
    for _ in range(3):
        out = torch.empty_like(x)
        lau[(triton.cdiv(1000, 64),)](x, y, out, 1000, 0.5, BLOCK=64)
        outs.append(out)
    assert len(lau.entries) == 1
    ref = torch.empty_like(x)
    _axpy[(triton.cdiv(1000, 64),)](x, y, ref, 1000, 0.5, BLOCK=64)
    for out in outs:
        assert torch.equal(out, ref)
    # a misaligned view needs another specialisation: a new entry, still the right values
    xm, ym, om = x[1:], y[1:], torch.empty(999, device="cuda")
    lau[(triton.cdiv(999, 64),)](xm, ym, om, 999, 0.5, BLOCK=64)
    assert len(lau.entries) == 2
    torch.testing.assert_close(om, 0.5 * xm + ym, rtol=0, atol=0)


@gpu
def test_swapped_config_list_clears_the_memo_gpu():
    tuned = triton.autotune(configs=[triton.Config({"BLOCK": 64})], key=["n"])(_axpy)
    lau = Launcher(tuned)
    x = torch.randn(1000, device="cuda")
    out = torch.empty_like(x)
    grid = lambda meta: (triton.cdiv(1000, meta["BLOCK"]),)  # noqa: E731
    first = lau[grid](x, x, out, 1000, 1.0)
    assert lau[grid](x, x, out, 1000, 1.0) is first and len(lau.entries) == 1
    tuned.configs = [triton.Config({"BLOCK": 128})]
    second = lau[grid](x, x, out, 1000, 1.0)
    assert second is not first and len(lau.entries) == 1
    assert lau.entries[next(iter(lau.entries))][1]["BLOCK"] == 128
    torch.testing.assert_close(out, 2.0 * x, rtol=0, atol=0)


def _attention_case(seg: bool):
    from fat5.ops.attention_triton import flash_attention

    b, h, length, d = 2, 4, 300, 64
    q, k, v = (torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    table = torch.randn(32, h, device="cuda")
    kw = {}
    if seg:
        ids = torch.cat([torch.zeros(b, 120), torch.ones(b, 100), 2 * torch.ones(b, 80)], 1).long().cuda()
        kw = {"q_segment_ids": ids, "kv_segment_ids": ids}
    for t in (q, k, v, table):
        t.requires_grad_(True)
    g = torch.randn_like(q)

    def run():
        for t in (q, k, v, table):
            t.grad = None
        out = flash_attention(q, k, v, rel_table=table, rel_max_distance=128, **kw)
        out.backward(g)
        return [out.detach().clone()] + [t.grad.clone() for t in (q, k, v, table)]

    return run


def _rmsnorm_case():
    from fat5.ops.rmsnorm import rms_norm_triton

    x = torch.randn(333, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(768, device="cuda", requires_grad=True)
    g = torch.randn(333, 768, device="cuda", dtype=torch.bfloat16)

    def run():
        x.grad = w.grad = None
        y = rms_norm_triton(x, w, 1e-6)
        y.backward(g)
        return [y.detach().clone(), x.grad.clone(), w.grad.clone()]

    return run


def _ce_case():
    from fat5.ops.cross_entropy import cross_entropy_triton

    logits = torch.randn(77, 32101, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 32101, (77,), device="cuda")
    labels[::5] = -100

    def run():
        logits.grad = None
        loss = cross_entropy_triton(logits, labels, z_loss=1e-4)[0]
        loss.backward()
        return [loss.detach().clone(), logits.grad.clone()]

    return run


def _act_case():
    from fat5.ops.activations import gated_act_triton

    gate = torch.randn(300, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(300, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(300, 2048, device="cuda", dtype=torch.bfloat16)

    def run():
        gate.grad = up.grad = None
        out = gated_act_triton(gate, up, "gelu_tanh")
        out.backward(g)
        return [out.detach().clone(), gate.grad.clone(), up.grad.clone()]

    return run


@gpu
@pytest.mark.parametrize("case", ["attention", "attention_segments", "rmsnorm", "cross_entropy", "gated_act"])
def test_ops_bitwise_equal_to_the_ordinary_path_gpu(case, monkeypatch):
    run = {
        "attention": lambda: _attention_case(False),
        "attention_segments": lambda: _attention_case(True),
        "rmsnorm": _rmsnorm_case,
        "cross_entropy": _ce_case,
        "gated_act": _act_case,
    }[case]()
    fast = [run() for _ in range(2)]  # the second call is served from the memo
    monkeypatch.setattr(Launcher, "run", lambda self, grid, *a, **kw: self.kernel[grid](*a, **kw))
    ordinary = run()
    for a, b in zip(fast[1], ordinary):
        assert torch.equal(a, b)
    for a, b in zip(fast[0], ordinary):
        assert torch.equal(a, b)


def test_host_cdiv_and_next_pow2_equal_triton():
    from fat5.ops.launch import cdiv, next_pow2

    for n in list(range(0, 2100)) + [2**31 - 1, 2**31, 2**40 + 3]:
        assert next_pow2(n) == triton.next_power_of_2(n), n
    for a in range(0, 300):
        for b in (1, 2, 3, 16, 64, 128, 129):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
