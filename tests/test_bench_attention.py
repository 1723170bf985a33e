"""The attention benchmark's baselines compute what they claim: SDPA with the materialised T5 bias and both
FlexAttention score_mods (eager flex on the CPU) against a float64 softmax with the bias built by distance, the
table gradient included; and the interleaved rounds' median. The timings themselves need a CUDA GPU."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_attention as ba  # noqa: E402
from fat5.positions import relative_position_bucket  # noqa: E402


def _reference(q, k, v, table, causal):
    length = q.shape[2]
    dist = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # key - query
    buckets = relative_position_bucket(dist, not causal, ba.BUCKETS, ba.MAXDIST)
    s = q.double() @ k.double().transpose(-1, -2) + table.double()[buckets].permute(2, 0, 1)
    if causal:
        s = s.masked_fill(dist > 0, float("-inf"))
    return torch.softmax(s, -1) @ v.double()


def _out_and_table_grad(fn, q, k, v, table, causal):
    table = table.detach().clone().requires_grad_(True)
    out = fn(q, k, v, table, causal)
    (out.double() * torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)).sum().backward()
    return out.detach().double(), table.grad.double()


def _flex_eager(clamped):
    from torch.nn.attention.flex_attention import create_block_mask

    def fn(q, k, v, table, causal):
        length = q.shape[2]
        bm = None
        if causal:
            bm = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, length, length, device="cpu")
        reach = ba.MAXDIST if clamped else length - 1
        rb = ba._flex_bias_rows(table, causal, reach, "cpu")
        return (ba._flex_call_clamped if clamped else ba._flex_call)(q, k, v, rb, bm)

    return fn


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("method", ["sdpa_bias", "flex", "flex_clamped"])
def test_baselines_compute_t5_attention(method, causal):
    torch.manual_seed(0)
    b, h, length, d = 1, ba.H, 300, 16  # 300 > max distance 128: far pairs on both sides
    q, k, v = (torch.randn(b, h, length, d) for _ in range(3))
    table = torch.randn(ba.BUCKETS, h)
    fn = ba.METHODS["sdpa_bias"] if method == "sdpa_bias" else _flex_eager(method == "flex_clamped")
    out, grad = _out_and_table_grad(fn, q, k, v, table, causal)
    ref, ref_grad = _out_and_table_grad(
        lambda q_, k_, v_, t_, c_: _reference(q_, k_, v_, t_, c_), q, k, v, table, causal
    )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4 * ref_grad.abs().max().item())


def test_rounds_median_per_timing():
    runs = [
        {"fwd_ms": 1.0, "fwdbwd_ms": 3.0, "mem_gib": 0.2},
        {"fwd_ms": 2.0, "fwdbwd_ms": 1.0, "mem_gib": 0.3},
        {"fwd_ms": 1.5, "fwdbwd_ms": 2.0, "mem_gib": 0.3},
    ]
    assert ba._median_run(runs) == {"fwd_ms": 1.5, "fwdbwd_ms": 2.0, "mem_gib": 0.2}
    oom = {"fwd_ms": "OOM", "fwdbwd_ms": "OOM", "mem_gib": "OOM"}
    assert ba._median_run([runs[0], oom])["fwd_ms"] == "OOM"


def test_report_rewritten_per_row_and_marked_until_complete(tmp_path, monkeypatch):
    import argparse
    import json

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    args = argparse.Namespace(commit="abc1234", out=str(tmp_path), quick=True, tag="_t", rounds=3)
    row = {"d": 64, "L": 1024, "B": 32, "causal": False}
    row.update(
        sdpa_fwd=400.0, sdpa_fwdbwd=360.0, sdpa_mem=0.28, ours_fwd=300.0, ours_fwdbwd=216.0, ours_mem=0.2
    )
    ba.write_reports(args, ["sdpa", "ours"], [row], {}, 0.0, complete=False)
    (md,) = tmp_path.glob("attention_*_quick_t.md")
    assert (
        "(partial" in md.read_text()
        and "| 64 | no | 1024 | 400 / 360 | 300 / 216 | 75% / 60% |" in md.read_text()
    )
    ba.write_reports(args, ["sdpa", "ours"], [row, {**row, "L": 4096}], {}, 0.0, complete=True)
    text = md.read_text()
    assert "(partial" not in text and "median over 3 interleaved rounds" in text and "commit abc1234" in text
    got = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [r["L"] for r in got["rows"]] == [1024, 4096] and got["meta"]["complete"] is True
