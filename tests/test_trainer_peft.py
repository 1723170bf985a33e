"""fat5 models under transformers' Trainer / Seq2SeqTrainer and PEFT LoRA, on tiny synthetic tasks (CPU).

Each task is small enough to be memorised in ~30 steps: the evaluation loss on the training set must fall.
LoRA must train only its adapters (plus the modules PEFT saves for the task), leave the base weights
bit-identical, give every adapter a gradient, and merge into the same function.
"""

import pytest
import torch
import transformers
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

from fat5 import FAT5Config, FAT5ForConditionalGeneration
from fat5.heads import FAT5ForQuestionAnswering, FAT5ForSequenceClassification, FAT5ForTokenClassification

V, L, N = 64, 12, 32  # vocab, sequence length, examples


@pytest.fixture(autouse=True)
def _quiet():
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def tiny(**kw) -> FAT5Config:
    base = dict(
        vocab_size=V,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
    return FAT5Config.from_preset("tiny", **{**base, **kw})


def ids_and_mask(g):
    ids = torch.randint(3, V, (N, L), generator=g)
    lengths = torch.randint(L // 2, L + 1, (N,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = ids * mask  # pad id 0
    return ids, mask, lengths


def dataset(task: str) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids, mask, lengths = ids_and_mask(g)
    rows = [dict(input_ids=ids[i], attention_mask=mask[i]) for i in range(N)]
    for i, row in enumerate(rows):
        if task == "seq":  # class = first token's residue
            row["labels"] = ids[i, 0] % 3
        elif task == "token":  # tag = token residue, padding ignored
            row["labels"] = torch.where(mask[i].bool(), ids[i] % 3, -100)
        elif task == "qa":  # the answer starts at the marker token 2 and spans 3 tokens
            start = int(torch.randint(0, int(lengths[i]) - 3, (1,), generator=g))
            row["input_ids"] = ids[i].clone()
            row["input_ids"][start] = 2
            row["start_positions"], row["end_positions"] = torch.tensor(start), torch.tensor(start + 2)
        elif task == "seq2seq":  # copy the first 4 tokens, then EOS
            row["labels"] = torch.cat([ids[i, :4], torch.tensor([1])])
    return rows


def args(tmp_path, cls=TrainingArguments, steps=30, **kw):
    return cls(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=1e-3 if "learning_rate" not in kw else kw.pop("learning_rate"),
        warmup_steps=0,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        **kw,
    )


HEADS = {
    "seq": (FAT5ForSequenceClassification, dict(num_labels=3)),
    "token": (FAT5ForTokenClassification, dict(num_labels=3)),
    "qa": (FAT5ForQuestionAnswering, {}),
}


@pytest.mark.parametrize(
    "task,gradient_checkpointing",
    [("seq", False), ("token", False), ("qa", False), ("token", True)],
    ids=["seq", "token", "qa", "token-grad-ckpt"],
)
def test_trainer_lowers_loss(task, gradient_checkpointing, tmp_path):
    torch.manual_seed(0)
    cls, extra = HEADS[task]
    model = cls(tiny(**extra))
    data = dataset(task)
    trainer = Trainer(
        model=model,
        args=args(tmp_path, gradient_checkpointing=gradient_checkpointing),
        train_dataset=data,
        eval_dataset=data,
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.7 * before, f"{task}: eval loss {before:.4f} -> {after:.4f}"
    assert model.is_gradient_checkpointing == gradient_checkpointing


def test_seq2seq_trainer_predict_with_generate(tmp_path):
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(tiny())
    data = dataset("seq2seq")
    trainer = Seq2SeqTrainer(
        model=model,
        args=args(tmp_path, Seq2SeqTrainingArguments, predict_with_generate=True, learning_rate=3e-3),
        train_dataset=data,
        eval_dataset=data,
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate(max_new_tokens=6)["eval_loss"]
    assert after < 0.7 * before, f"eval loss {before:.4f} -> {after:.4f}"

    out = trainer.predict(data[:8], max_new_tokens=6, num_beams=2)
    ids = torch.stack([r["input_ids"] for r in data[:8]])
    mask = torch.stack([r["attention_mask"] for r in data[:8]])
    model.eval()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=2)
    preds = torch.as_tensor(out.predictions)
    assert preds.shape[0] == 8
    # Trainer pads predictions (with -100 / pad) to a common length; the generated prefix must be identical
    assert torch.equal(preds[:, : expected.shape[1]], expected)
    assert out.metrics["test_loss"] < before


# ---------------------------------------------------------------- PEFT


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("task", ["seq2seq", "seq"])
def test_lora_trains_only_adapters_and_merges(task, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    if task == "seq2seq":
        base, task_type = FAT5ForConditionalGeneration(tiny()), peft.TaskType.SEQ_2_SEQ_LM
        trainer_cls, args_cls = Seq2SeqTrainer, Seq2SeqTrainingArguments
    else:
        base, task_type = FAT5ForSequenceClassification(tiny(num_labels=3)), peft.TaskType.SEQ_CLS
        trainer_cls, args_cls = Trainer, TrainingArguments
    before_base = _snapshot(base)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q", "k", "v", "o"], task_type=task_type
    )
    model = peft.get_peft_model(base, lora)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if "lora_" in n}
    n_attn = sum(1 for m in base.modules() if type(m).__name__ == "Attention")
    assert len(adapters) == 2 * 4 * n_attn  # A and B for q, k, v, o of every attention
    # SEQ_CLS also trains (and saves) the fresh classifier, as PEFT does for transformers' heads
    others = trainable - adapters
    assert all(".classifier." in n for n in others) and (bool(others) == (task == "seq")), others

    data = dataset(task)
    # the usual LoRA recipe also checkpoints activations: exercise it on the encoder head
    gc = task == "seq"
    trainer = trainer_cls(
        model=model,
        args=args(tmp_path, args_cls, learning_rate=3e-3, gradient_checkpointing=gc),
        train_dataset=data,
        eval_dataset=data,
    )
    loss0 = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < loss0
    assert base.is_gradient_checkpointing == gc

    # base weights bit-identical; every adapter moved (LoRA B starts at zero, so it must have had a gradient)
    for name, p in model.named_parameters():
        if name in trainable:
            continue
        orig = (
            name.replace("base_model.model.", "", 1)
            .replace(".base_layer", "")
            .replace(".original_module", "")
        )
        assert torch.equal(p, before_base[orig]), f"frozen weight {orig} changed"
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert torch.count_nonzero(p).item() > 0, (
                f"adapter {name} never trained (is its projection bypassed?)"
            )

    model.eval()
    ids = torch.stack([r["input_ids"] for r in data[:4]])
    mask = torch.stack([r["attention_mask"] for r in data[:4]])
    kw = dict(input_ids=ids, attention_mask=mask)
    if task == "seq2seq":
        kw["decoder_input_ids"] = torch.stack([r["labels"] for r in data[:4]])
    with torch.no_grad():
        adapted = model(**kw).logits
        merged_model = model.merge_and_unload()
        merged = merged_model(**kw).logits
    assert type(merged_model) is type(base)
    assert not any("lora_" in n for n, _ in merged_model.named_parameters())
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
