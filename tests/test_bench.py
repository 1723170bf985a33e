"""The training-step benchmark's report (fat5.bench.write_report): rows as measured, failures named, the code's
commit recorded. The timing itself needs a CUDA GPU and runs only there."""

import json

import pytest
import torch

from fat5 import bench


def test_report_keeps_rows_and_names_failures(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    rows = [
        bench.Result("fat5-graph", "base", 512, 114, 64, 501080.4, 80.0, 0.452, 17.2),
        bench.Result("hf", "base", 16384, 16384, 1, None, None, None, None, "out of memory"),
    ]
    bench.write_report(rows[:1], 689.0, tmp_path, "_t", commit="abc1234", quiet=True)
    bench.write_report(rows, 689.0, tmp_path, "_t", commit="abc1234", quiet=True)  # rewritten per row
    (md,) = tmp_path.glob("*-model_t.md")
    text = md.read_text()
    assert "| base | 512/114 | 64 | fat5-graph | 501,080 | 80.0 | 45.2% | 17.2 |  |" in text
    assert "| base | 16384/16384 | 1 | hf | out of memory | | | | |" in text
    (png,) = tmp_path.glob("*-model_t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png.name})" in text
    assert "commit abc1234" in text and "Test GPU" in text
    (js,) = tmp_path.glob("*-model_t.json")
    got = json.loads(js.read_text())
    assert [r["impl"] for r in got] == ["fat5-graph", "hf"] and got[1]["tokens_per_s"] is None


def test_report_commit_defaults_to_git_head(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    monkeypatch.setattr(bench, "_head_commit", lambda: "def5678 + local changes")
    bench.write_report([], 1.0, tmp_path, quiet=True)
    assert "commit def5678 + local changes" in next(tmp_path.glob("*.md")).read_text()


def test_report_ratios_against_hf_of_the_same_shape(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    rows = [
        bench.Result("fat5-graph", "base", 512, 114, 64, 500000.0, 80.0, 0.45, 18.0),
        bench.Result("hf", "base", 512, 114, 64, 125000.0, 320.0, 0.11, 54.0),
        bench.Result("fat5-graph", "base", 16384, 16384, 1, 100000.0, 330.0, 0.44, 16.0),
        bench.Result("hf", "base", 16384, 16384, 1, None, None, None, None, "out of memory"),
    ]
    bench.write_report(rows, 689.0, tmp_path, commit="abc1234", quiet=True)
    text = next(tmp_path.glob("*.md")).read_text()
    assert "| 45.0% | 18.0 | 4.00x, 0.33x |" in text
    assert "| 44.0% | 16.0 | hf: out of memory |" in text
    assert "| hf | 125,000 | 320.0 | 11.0% | 54.0 |  |" in text


@pytest.mark.gpu
def test_whole_step_graph_trains_like_eager_steps_gpu():
    """fat5-step-graph's captured step (forward, backward, fused AdamW) is a real training step: its replays
    give the losses of the same steps run eagerly (3 warm-up steps, then one per replay)."""
    from fat5 import FAT5Config, FAT5ForConditionalGeneration

    cfg = FAT5Config.from_preset("tiny")
    torch.manual_seed(0)
    models = [FAT5ForConditionalGeneration(cfg).cuda().train() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ids = torch.randint(2, cfg.vocab_size, (4, 64), device="cuda")
    labels = torch.randint(2, cfg.vocab_size, (4, 16), device="cuda")
    replay, _, loss = bench._whole_step_graph(models[0], ids, labels, lr=1e-3)
    graph_losses = []
    for _ in range(4):
        replay()
        graph_losses.append(loss.item())
    opt = torch.optim.AdamW(models[1].parameters(), lr=1e-3, fused=True)
    eager = []
    for _ in range(7):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = models[1](input_ids=ids, labels=labels).loss
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        eager.append(out.item())
    assert graph_losses[-1] < graph_losses[0]
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager[3:]), rtol=2e-2, atol=2e-2)
