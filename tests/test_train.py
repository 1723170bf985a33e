"""The training loop, checkpoints/resume, bad input, and the pretrain / finetune commands (CPU, tiny)."""

import argparse
import json
import math
import os
import random
import signal

import pytest
import torch

from fat5 import FAT5ForConditionalGeneration
from fat5.finetune import rouge_l
from fat5.optim import skip_step_on_device
from fat5.runconfig import load_run_config
from fat5.train import Trainer, TrainingDiverged, add_train_commands, latest_checkpoint


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class CopyBatches:
    """Endless copy-task batches, deterministic per step; the global batch of a step is split by rank."""

    def __init__(self, batch=8, length=10, symbols=16, seed=0, rank=0, world_size=1):
        self.batch, self.length, self.symbols, self.seed = batch, length, symbols, seed
        self.rank, self.world_size, self.i = rank, world_size, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.i)
            x = torch.randint(3, 3 + self.symbols, (self.batch * self.world_size, self.length), generator=g)
            lengths = torch.randint(self.length // 2, self.length + 1, (x.shape[0],), generator=g)
            mask = (torch.arange(self.length)[None] < lengths[:, None]).long()
            x = x * mask  # right padding with pad id 0
            mine = slice(self.rank * self.batch, (self.rank + 1) * self.batch)
            self.i += 1
            yield {
                "input_ids": x[mine],
                "attention_mask": mask[mine],
                "labels": x[mine].masked_fill(mask[mine] == 0, -100),
                "decoder_attention_mask": mask[mine],
            }

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


SMALL = [
    "model.vocab_size=64",
    "model.d_model=32",
    "model.d_ff=64",
    "model.d_kv=8",
    "model.num_heads=4",
    "train.device=cpu",
    "train.precision=fp32",
    "optim.lr=1e-2",
    "schedule.warmup_steps=5",
]


def make_trainer(out, overrides=(), resume=False, data=None):
    cfg = load_run_config(None, SMALL + list(overrides))
    torch.manual_seed(cfg.train.seed)
    model = FAT5ForConditionalGeneration(cfg.model_config())
    val = list(zip(range(2), CopyBatches(seed=99)))
    return Trainer(
        cfg,
        model,
        data or CopyBatches(),
        out,
        val_data=lambda: [b for _, b in val],
        resume=resume,
        show_progress=False,
    )


def test_loss_falls_and_logs_are_written(tmp_path):
    tr = make_trainer(tmp_path, ["train.max_steps=40", "train.eval_every=20", "train.log_every=10"])
    losses = tr.fit()
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    for name in ("train.csv", "eval.csv", "loss.png", "run.yaml"):
        assert (tmp_path / name).exists(), name
    assert any(p.name.startswith("events") for p in (tmp_path / "tb").iterdir())
    rows = (tmp_path / "eval.csv").read_text().splitlines()
    assert rows[0] == "step,val_loss" and len(rows) == 3
    ck = latest_checkpoint(tmp_path)
    assert ck.name == "step-00000040" and (ck / "model.safetensors").exists()
    FAT5ForConditionalGeneration.from_pretrained(str(ck))  # a loadable save_pretrained folder


def test_stop_and_resume_is_exact(tmp_path):
    common = [
        "train.max_steps=20",
        "train.ckpt_every=100",
        "train.eval_every=5",
        "model.dropout_rate=0.1",
        "train.grad_accum=2",
    ]
    full = make_trainer(tmp_path / "full", common)
    full.fit()

    first = make_trainer(tmp_path / "split", common)
    # an interruption (SIGINT) after step 10: the handler saves a checkpoint at the end of the step
    first.on_step_end.append(lambda t: t.step == 10 and os.kill(os.getpid(), signal.SIGINT))
    first.fit()
    assert first.step == 10 and latest_checkpoint(tmp_path / "split").name == "step-00000010"
    random.random(), torch.rand(3)  # disturb the global RNGs: resume must restore them
    second = make_trainer(tmp_path / "split", common, resume=True)
    assert second.step == 10
    second.fit()
    assert second.step == 20
    for (name, a), (_, b) in zip(full.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(a, b), name
    assert len((tmp_path / "split" / "train.csv").read_text().splitlines()) == 1 + 20 // 10


def test_unknown_config_key_names_valid_keys():
    with pytest.raises(ValueError, match=r"unknown key 'train.max_step'.*max_steps.*grad_accum"):
        load_run_config(None, ["train.max_step=3"])
    with pytest.raises(ValueError, match=r"valid sections: model, data, optim, schedule, train"):
        load_run_config(None, ["trian.max_steps=3"])
    with pytest.raises(ValueError, match=r"unknown model key 'dmodel'.*d_model"):
        load_run_config(None, ["model.dmodel=3"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_run_config(None, ["train.max_steps"])


def test_compile_mode_checked():
    cfg = load_run_config(None, ["train.compile=true", "train.compile_mode=reduce-overhead"])
    assert cfg.train.compile_mode == "reduce-overhead"
    with pytest.raises(ValueError, match=r"unknown train.compile_mode 'graphs'.*reduce-overhead"):
        load_run_config(None, ["train.compile=true", "train.compile_mode=graphs"])
    with pytest.raises(ValueError, match=r"only with train.compile=true"):
        load_run_config(None, ["train.compile_mode=reduce-overhead"])


def test_yaml_config_and_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "model: {preset: tiny, d_model: 64}\noptim: {lr: 3e-4, betas: [0.9, 0.95]}\n"
    )
    cfg = load_run_config(tmp_path / "run.yaml", ["optim.lr=1e-3", "train.compile=true"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == [0.9, 0.95] and cfg.train.compile is True
    assert cfg.model_config().d_model == 64
    (tmp_path / "bad.yaml").write_text("optim: {lrr: 1}\n")
    with pytest.raises(ValueError, match="unknown key 'optim.lrr'"):
        load_run_config(tmp_path / "bad.yaml")


def test_resume_with_other_model_config_names_the_fields(tmp_path):
    make_trainer(tmp_path, ["train.max_steps=2"]).fit()
    with pytest.raises(ValueError, match=r"d_ff: checkpoint 64 vs now 96"):
        make_trainer(tmp_path, ["train.max_steps=4", "model.d_ff=96"], resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        make_trainer(tmp_path / "empty", resume=True)


def test_failed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    make_trainer(tmp_path, ["train.max_steps=2"]).fit()
    good = latest_checkpoint(tmp_path)
    saved = FAT5ForConditionalGeneration.from_pretrained(str(good)).state_dict()

    def broken_save(*a, **k):  # the weights are already written when the trainer state fails
        raise OSError("No space left on device")

    tr = make_trainer(tmp_path, ["train.max_steps=4"], resume=True)
    monkeypatch.setattr("fat5.train.torch.save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        tr.fit()
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == good
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    again = make_trainer(tmp_path, ["train.max_steps=4"], resume=True)
    assert again.step == 2
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def _diverge_with_nan_weights(tr):
    """A NaN embedding row: every step is non-finite; fit stops after 3 with no update applied."""
    with torch.no_grad():
        tr.model.shared.weight[5] = float("nan")
    before = tr.model.encoder.final_norm.weight.detach().clone()
    with (
        pytest.warns(UserWarning, match="non-finite"),
        pytest.raises(TrainingDiverged, match="3 steps in a row"),
    ):
        tr.fit()
    assert torch.equal(tr.model.encoder.final_norm.weight, before)  # no update was applied


@pytest.mark.parametrize("optim", ["adamwscale", "adamw", "adafactor"])
def test_non_finite_steps_are_skipped_then_stop(tmp_path, optim):
    tr = make_trainer(tmp_path, ["train.max_steps=10", "train.max_bad_steps=3", f"optim.name={optim}"])
    _diverge_with_nan_weights(tr)


def test_step_stats_are_read_only_at_logging_steps(tmp_path, monkeypatch):
    # the host reads the per-step numbers once per logging interval, not once per step
    tr = make_trainer(tmp_path, ["train.max_steps=8", "train.log_every=4", "train.eval_every=100"])
    calls = []
    drain = tr._drain
    monkeypatch.setattr(tr, "_drain", lambda pending: calls.append(len(pending)) or drain(pending))
    losses = tr.fit()
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert [n for n in calls if n] == [4, 4]


@pytest.mark.gpu
def test_non_finite_steps_are_skipped_on_the_device_gpu(tmp_path):
    tr = make_trainer(tmp_path, ["train.max_steps=10", "train.max_bad_steps=3", "train.device=cuda"])
    _diverge_with_nan_weights(tr)
    assert skip_step_on_device(tr.optimizer)  # the kernel path decided it (state exists, grads were set)
    assert all(float(s["step"]) == 0 for s in tr.optimizer.state.values())


@pytest.mark.gpu
def test_training_step_never_syncs_the_host_gpu(tmp_path):
    # after the first steps (state creation), a step issues no synchronising CUDA call: torch raises on one
    tr = make_trainer(tmp_path, ["train.max_steps=10", "train.device=cuda"])
    it = iter(tr.train_source)
    for _ in range(2):
        tr.train_step(tr._micro_batches(it))
    batches = [tr._micro_batches(it) for _ in range(3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = [tr.train_step(micro) for micro in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rows = tr._drain([(tr.step - 2 + i, s) for i, s in enumerate(stats)])
    assert all(r[3] == 1.0 for r in rows)  # applied


def test_rouge_l():
    assert rouge_l("a b c d", "a b c d") == 1.0
    assert rouge_l("a x c", "a b c") == pytest.approx(2 / 3)
    assert rouge_l("", "a") == 0.0


def _cli(argv):
    parser = argparse.ArgumentParser(prog="fat5")
    add_train_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


@pytest.mark.slow
def test_pretrain_command_small_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran far away from home".split()
    for i in range(30):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(300)))
    out = tmp_path / "run"
    args = [
        "pretrain",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--corpus",
        str(corpus),
        "--quiet",
        "model.vocab_size=768",
        "model.d_model=32",
        "model.d_ff=64",
        "model.d_kv=8",
        "train.max_steps=4",
        "train.batch_size=4",
        "train.enc_len=64",
        "train.dec_len=32",
        "train.eval_every=2",
        "data.val_fraction=0.2",
        "data.eval_batches=1",
        "train.device=cpu",
    ]
    _cli(args)
    final = out / "final"
    model = FAT5ForConditionalGeneration.from_pretrained(str(final))
    assert model.config.d_model == 32 and (final / "tokenizer.json").exists()
    assert (out / "loss.png").exists() and latest_checkpoint(out).name == "step-00000004"
    with pytest.raises(ValueError, match="--resume to continue"):
        _cli(args)  # a second run into the same folder must not silently overwrite the first


@pytest.mark.slow
def test_finetune_improves_exact_match(tmp_path):
    from fat5.config import FAT5Config
    from fat5.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    letters = "abcdefgh"

    def example():
        s = " ".join(rng.choice(letters) for _ in range(4))
        return {"input": s, "target": s}

    train = [example() for _ in range(512)]
    valid = [example() for _ in range(32)]
    for name, rows in (("train.jsonl", train), ("valid.jsonl", valid)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = tmp_path / "base"
    tok = train_tokenizer([r["input"] for r in train], 270, base, kind="bpe", num_sentinels=0)
    cfg = FAT5Config.from_preset(
        "tiny",
        vocab_size=len(tok),
        d_model=64,
        d_ff=128,
        d_kv=16,
        num_heads=4,
        num_layers=1,
        num_decoder_layers=1,
    )
    torch.manual_seed(0)
    FAT5ForConditionalGeneration(cfg).save_pretrained(str(base))
    out = tmp_path / "ft"
    _cli(
        [
            "finetune",
            "--model",
            str(base),
            "--train",
            str(tmp_path / "train.jsonl"),
            "--valid",
            str(tmp_path / "valid.jsonl"),
            "--out",
            str(out),
            "--quiet",
            "train.max_steps=400",
            "train.eval_every=400",
            "train.batch_size=32",
            "train.enc_len=16",
            "train.dec_len=12",
            "optim.lr=1e-2",
            "train.device=cpu",
            "train.precision=fp32",
        ]
    )
    import csv

    rows = list(csv.DictReader(open(out / "eval.csv")))
    assert [int(r["step"]) for r in rows] == [0, 400]
    first, last = float(rows[0]["exact_match"]), float(rows[-1]["exact_match"])
    assert first == 0.0 and last >= 0.5, (first, last)
    preds = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert len(preds) == 32 and {"input", "target", "prediction"} <= set(preds[0])
    assert (out / "final" / "model.safetensors").exists()
