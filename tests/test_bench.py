"""The training-step benchmark's report (fat5.bench.write_report): rows as measured, failures named, the code's
commit recorded. The timing itself needs a CUDA GPU and runs only there."""

import json

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
    assert "| base | 512/114 | 64 | fat5-graph | 501,080 | 80.0 | 45.2% | 17.2 |" in text
    assert "| base | 16384/16384 | 1 | hf | out of memory | | | |" in text
    assert "commit abc1234" in text and "Test GPU" in text
    (js,) = tmp_path.glob("*-model_t.json")
    got = json.loads(js.read_text())
    assert [r["impl"] for r in got] == ["fat5-graph", "hf"] and got[1]["tokens_per_s"] is None


def test_report_commit_defaults_to_git_head(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    monkeypatch.setattr(bench, "_head_commit", lambda: "def5678 + local changes")
    bench.write_report([], 1.0, tmp_path, quiet=True)
    assert "commit def5678 + local changes" in next(tmp_path.glob("*.md")).read_text()
