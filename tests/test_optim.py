"""AdamWScale (fp32, bf16 + Kahan, pure bf16), build_optimizer and the LR schedules."""

import copy

import pytest
import torch

from fat5 import FAT5Config, FAT5ForConditionalGeneration
from fat5.optim import (
    AdamWScale,
    build_optimizer,
    build_scheduler,
    optimizer_step,
    schedule_factor,
    skip_step_on_device,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tests run two to a 2-core machine: no oversubscription
    yield
    torch.set_num_threads(n)


def _reference_step(p, g, m, v, step, lr, b1, b2, eps, wd):
    """nanoT5's AdamWScale for one tensor, written plainly (decoupled decay folded into the update)."""
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    rms = max(1e-3, (p.norm() / p.numel() ** 0.5).item())
    v_hat = v / (1 - b2**step)
    update = -lr / (1 - b1**step) * rms * m / (v_hat.sqrt() + eps) - lr * wd * p
    p.add_(update)


@pytest.mark.parametrize("kernel", [False, True])
def test_adamwscale_fp32_matches_reference(kernel):
    # kernel=True: the fused Triton update (the CPU interpreter in CI), step counts on the device
    torch.manual_seed(0)
    shapes = [(7, 5), (3,), (1,), (33, 2)]
    params = [torch.randn(s) * (0.1 if i % 2 else 1e-5) for i, s in enumerate(shapes)]  # one below the floor
    ref = [p.clone() for p in params]
    ps = [torch.nn.Parameter(p) for p in params]
    opt = AdamWScale(ps, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, kernel=kernel)
    ms = [torch.zeros_like(p) for p in ref]
    vs = [torch.zeros_like(p) for p in ref]
    for step in range(1, 6):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        for p, g, m, v in zip(ref, grads, ms, vs):
            _reference_step(p, g, m, v, step, 0.01, 0.9, 0.99, 1e-8, 0.1)
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-7)


def _kahan_run(kernel: bool, dtype=torch.float16, device="cpu", steps: int = 30):
    # low-precision weights, updates far below half an ulp: only the compensation buffer keeps them.
    # fp16 on CPU: the Triton interpreter truncates fp32 -> bf16 (the GPU rounds to nearest), which would
    # bias every stored bf16 value; its fp16 conversion rounds like the GPU.
    torch.manual_seed(0)
    p = torch.nn.Parameter((torch.randn(64, 33) + 3.0).to(device=device, dtype=dtype))
    master = p.detach().double().clone()
    opt = AdamWScale([p], lr=1e-4, betas=(0.9, 0.99), kahan=True, kernel=kernel)
    m, v = torch.zeros_like(master), torch.zeros_like(master)
    for step in range(1, steps + 1):
        # |g| >= 0.5: g^2 (1 - b2) stays far above fp16's smallest values, so the second moment is exact enough
        g = torch.randn(64, 33).sign() * (0.5 + torch.rand(64, 33))
        p.grad = g.to(device=device, dtype=dtype)
        opt.step()
        # the same update in float64 on a float64 copy: what the compensated weight should track
        _reference_step(master, p.grad.double(), m, v, step, 1e-4, 0.9, 0.99, 1e-8, 0.0)
    got = p.detach().double() + opt.state[p]["kahan_comp"].double()
    return (got - master).abs().max().item(), (p.detach().double() - master).abs().max().item()


@pytest.mark.parametrize("kernel", [False, True])
def test_kahan_weight_plus_compensation_tracks_float64(kernel):
    err, err_weight_alone = _kahan_run(kernel)
    # the weights alone lag by up to half an ulp (2^-10 at 3.0 in fp16); weight + compensation far less
    assert err < 5e-5, err
    assert err_weight_alone > 4 * err


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", [False, True])
def test_kahan_bf16_gpu(kernel):
    # bf16 on the GPU (round to nearest): weight + compensation within 1/16 of half a bf16 ulp at 3.0 (2^-7)
    err, err_weight_alone = _kahan_run(kernel, torch.bfloat16, "cuda")
    assert err < 5e-4 and err_weight_alone > 4 * err, (err, err_weight_alone)


@pytest.mark.parametrize("kernel", [False, True])
def test_skip_if_changes_nothing(kernel):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4).to(torch.bfloat16))]
    opt = AdamWScale(ps, lr=1e-2, weight_decay=0.1, kernel=kernel)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    snap = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in ps]
    for p in ps:
        p.grad = torch.full_like(p, float("nan"))
    opt.step(skip_if=torch.tensor(True))
    for p, before in zip(ps, snap[1]):
        assert torch.equal(p.detach(), before)
    for i, s in opt.state_dict()["state"].items():
        for k, t in s.items():
            assert torch.equal(t.cpu(), snap[0]["state"][i][k].cpu()), (i, k)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step(skip_if=torch.tensor(False))
    assert all(float(s["step"]) == 2.0 for s in opt.state.values())
    assert not any(torch.equal(p.detach(), b) for p, b in zip(ps, snap[1]))


def test_kernel_counts_steps_of_empty_tensors_too():
    """The kernel path counts the step on the device for every tensor, an empty one (an FSDP shard may be)
    included, and not at all on a skipped step."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.empty(0))]
    opt = AdamWScale(ps, lr=1e-2, kernel=True)
    for flag in (False, True, False):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step(skip_if=torch.tensor(flag))
    assert [float(opt.state[p]["step"]) for p in ps] == [2.0, 2.0]


def test_kernel_address_table_reused_only_while_addresses_hold():
    """The kernel path keeps the device copy of its address table while no tensor moved (gradients written in
    place), and rebuilds it when a gradient comes back at a new address; both give the foreach path's values."""
    from fat5.ops import adamw_scale

    torch.manual_seed(0)
    shapes = [(6, 4), (9,), (3, 3)]
    runs = {}
    for kernel in (False, True):
        adamw_scale._PTRS.clear()
        ps = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in
              enumerate(shapes)]  # fmt: skip
        opt = AdamWScale(ps, lr=1e-2, weight_decay=0.1, kernel=kernel)
        gen = torch.Generator().manual_seed(5)
        for p in ps:
            p.grad = torch.zeros_like(p)
        tables, kept = [], []
        for step in range(4):
            if step == 2:  # new gradient tensors; the old ones stay alive, so the addresses must differ
                kept = [p.grad for p in ps]
                for p in ps:
                    p.grad = torch.zeros_like(p)
            for p in ps:
                p.grad.copy_(torch.randn(p.shape, generator=gen))
            opt.step()
            if kernel:
                (entry,) = adamw_scale._PTRS.values()
                tables.append(entry[1])
        runs[kernel] = [p.detach().clone() for p in ps]
        if kernel:
            assert tables[1] is tables[0] and tables[3] is tables[2]  # in place: the same device table
            assert tables[2] is not tables[1]  # moved gradients: a new one
            assert kept
    for a, b in zip(runs[True], runs[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kernel", [False, True])
def test_copied_and_pickled_optimizer_keeps_working(kernel):
    import pickle

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = AdamWScale([p], lr=1e-2, kernel=kernel)
    p.grad = torch.randn_like(p)
    opt.step()
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert other.kernel is kernel
        (q,) = other.param_groups[0]["params"]
        q.grad = torch.randn_like(q)
        before = q.detach().clone()
        other.step()
        assert not torch.equal(q.detach(), before)


def test_kernel_and_foreach_resume_each_other():
    # the kernel keeps step counts on the parameters' device; a checkpoint of either path loads into the other
    torch.manual_seed(0)
    base = torch.randn(6, 4)
    runs = {}
    for first, second in ((False, True), (True, False), (False, False)):
        p = torch.nn.Parameter(base.clone())
        opt = AdamWScale([p], lr=1e-2, kernel=first)
        gen = torch.Generator().manual_seed(3)
        for _ in range(2):
            p.grad = torch.randn(6, 4, generator=gen)
            opt.step()
        opt2 = AdamWScale([p], lr=1e-2, kernel=second)
        opt2.load_state_dict(opt.state_dict())
        for _ in range(2):
            p.grad = torch.randn(6, 4, generator=gen)
            opt2.step()
        runs[(first, second)] = p.detach().clone()
    ref = runs[(False, False)]
    for k, v in runs.items():
        torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-7, msg=str(k))


def test_adamwscale_state_roundtrip_and_kahan_buffer():
    p = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    opt = AdamWScale([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["kahan_comp"].dtype == torch.bfloat16
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
    opt2 = AdamWScale([p], lr=1e-3)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.state[p]["kahan_comp"], opt.state[p]["kahan_comp"])
    assert "kahan_comp" not in AdamWScale([torch.nn.Parameter(torch.randn(3))], kahan=True).state


def _train_curve(base, data, mode: str, lr: float, steps: int) -> torch.Tensor:
    model = copy.deepcopy(base)
    if mode != "fp32-master":
        model.to(torch.bfloat16)
    opt = AdamWScale(model.parameters(), lr=lr, betas=(0.9, 0.99), kahan=mode == "bf16-kahan")
    losses = []
    for s in range(steps):
        # fp32 master weights run the forward under bf16 autocast, the way training uses them
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "fp32-master"):
            loss = model(**data[s % len(data)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses)


@pytest.mark.slow
def test_bf16_kahan_tracks_fp32_master_and_plain_bf16_lags():
    # lr 1e-3: AdamWScale moves each weight by ~1e-3 of its RMS per step, below half a bf16 ulp (2^-9):
    # plain bf16 rounds most updates away, Kahan compensation keeps them.
    cfg = FAT5Config.from_preset("tiny", vocab_size=128, d_model=64, d_ff=128, d_kv=16, num_heads=4)
    torch.manual_seed(0)
    base = FAT5ForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(200):
        x = torch.randint(3, 19, (8, 12), generator=g)  # copy task over 16 symbols
        data.append(dict(input_ids=x, attention_mask=torch.ones_like(x), labels=x))
    steps, w = 200, 20
    curves = {m: _train_curve(base, data, m, 1e-3, steps) for m in ("fp32-master", "bf16-kahan", "bf16")}
    smooth = {m: c.reshape(-1, w).mean(1) for m, c in curves.items()}  # 20-step window means
    ref = smooth["fp32-master"]
    assert ref[-1] < 0.8 * ref[0], "the fp32 run itself should learn"
    rel = ((smooth["bf16-kahan"] - ref).abs() / ref).max().item()
    assert rel < 0.02, f"bf16+Kahan deviates from fp32 master weights by {rel:.1%}"
    lag = (smooth["bf16"][-1] / ref[-1]).item()
    assert lag > 1.15, f"plain bf16 should lag clearly at this LR (final loss ratio {lag:.3f})"


def test_build_optimizer_choices():
    ps = [torch.nn.Parameter(torch.randn(3, 3))]
    assert isinstance(build_optimizer("adamwscale", ps, lr=1e-2), AdamWScale)
    assert isinstance(build_optimizer("adamw", ps, lr=1e-3), torch.optim.AdamW)
    assert isinstance(build_optimizer("adafactor", ps, lr=1e-3), torch.optim.Adafactor)
    with pytest.raises(ValueError, match="valid choices: adamwscale, adamw, adafactor"):
        build_optimizer("sgdd", ps, lr=1.0)


def test_schedules():
    f = lambda name, s, **kw: schedule_factor(name, s, 100, warmup_steps=10, min_lr_ratio=0.1, **kw)
    assert f("cosine", 0) == pytest.approx(0.1)  # warmup: (step + 1) / warmup
    assert f("cosine", 9) == pytest.approx(1.0)
    assert f("cosine", 10) == pytest.approx(1.0)
    assert f("cosine", 55) == pytest.approx(0.55)
    assert f("cosine", 100) == pytest.approx(0.1)
    assert f("inverse_sqrt", 40) == pytest.approx(0.5)
    assert f("constant", 70) == 1.0
    assert f("wsd", 79, decay_fraction=0.2) == 1.0
    assert f("wsd", 90, decay_fraction=0.2) == pytest.approx(0.55)
    assert f("wsd", 100, decay_fraction=0.2) == pytest.approx(0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, "cosine", 100, warmup_steps=10, min_lr_ratio=0.1)
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="valid choices: cosine, inverse_sqrt, wsd, constant"):
        build_scheduler(opt, "linear", 100)


def test_optimizer_step_skips_fused_adamw_on_the_device_flag():
    # torch's fused AdamW reads found_inf (what optimizer_step sets): a skipped step changes nothing
    p = torch.nn.Parameter(torch.randn(8, 3))
    opt = torch.optim.AdamW([p], lr=1e-2, fused=True)
    assert skip_step_on_device(opt)
    p.grad = torch.randn_like(p)
    optimizer_step(opt, torch.tensor(False))
    before, step = p.detach().clone(), float(opt.state[p]["step"])
    p.grad = torch.full_like(p, float("nan"))
    optimizer_step(opt, torch.tensor(True))
    assert torch.equal(p.detach(), before) and float(opt.state[p]["step"]) == step == 1.0
    assert not hasattr(opt, "found_inf")
    p.grad = torch.randn_like(p)
    optimizer_step(opt, torch.tensor(False))
    assert not torch.equal(p.detach(), before) and float(opt.state[p]["step"]) == 2.0
