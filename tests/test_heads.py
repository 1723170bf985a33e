"""Encoder task heads: output types and shapes, losses against torch.nn.functional by hand, pooling,
padding invariance, head initialisation, clear errors."""

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import (
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from fat5 import FAT5Config, FAT5EncoderModel
from fat5.heads import (
    FAT5ForQuestionAnswering,
    FAT5ForSequenceClassification,
    FAT5ForTokenClassification,
    pool,
)

V = 128


def tiny(**kw) -> FAT5Config:
    base = dict(
        vocab_size=V,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=1,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
    return FAT5Config.from_preset("tiny", **{**base, **kw})


def make(cls, **kw):
    model = cls(tiny(**kw)).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: make them informative
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.uniform_(0.5, 1.5)
    return model


def batch(b=3, length=9, pad_from=(9, 5, 2)):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (b, length), generator=g)
    mask = torch.ones_like(ids)
    for i, start in enumerate(pad_from):
        ids[i, start:] = 0
        mask[i, start:] = 0
    return ids, mask


def hidden(model, ids, mask):
    """The head's own encoder output, through a FAT5EncoderModel holding the same weights."""
    enc = FAT5EncoderModel(model.config).eval()
    enc.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(("shared", "encoder"))})
    return enc(ids, attention_mask=mask).last_hidden_state


# ---------------------------------------------------------------- pooling


def test_pool_by_hand():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    torch.testing.assert_close(pool(h, right, "mean"), torch.stack([h[0, :3].mean(0), h[1, :2].mean(0)]))
    torch.testing.assert_close(pool(h, left, "mean"), torch.stack([h[0, 1:].mean(0), h[1, 2:].mean(0)]))
    assert torch.equal(pool(h, right, "first"), h[:, 0])
    assert torch.equal(pool(h, left, "first"), torch.stack([h[0, 1], h[1, 2]]))
    assert torch.equal(pool(h, right, "eos"), torch.stack([h[0, 2], h[1, 1]]))
    assert torch.equal(pool(h, left, "eos"), h[:, 3])
    assert torch.equal(pool(h, None, "eos"), h[:, -1])
    torch.testing.assert_close(pool(h, None, "mean"), h.mean(1))


def test_pool_ignores_nonfinite_padding():
    h = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    h_bad = h.clone()
    h_bad[0, 3:] = float("nan")
    assert torch.equal(pool(h_bad, mask, "mean"), pool(h, mask, "mean"))


def test_pool_errors():
    with pytest.raises(ValueError, match="no real token"):
        pool(torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [0, 0, 0]]), "mean")
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(torch.randn(2, 3, 4), None, "max")


# ---------------------------------------------------------------- sequence classification


@pytest.mark.parametrize("pooling", ["mean", "first", "eos"])
def test_sequence_classification_shapes_and_head(pooling):
    model = make(FAT5ForSequenceClassification, num_labels=3, pooling=pooling)
    ids, mask = batch()
    out = model(ids, attention_mask=mask)
    assert isinstance(out, SequenceClassifierOutput) and out.loss is None
    assert out.logits.shape == (3, 3)
    # the logits are the classification head applied to the pooled encoder output
    c = model.classifier
    pooled = pool(hidden(model, ids, mask), mask, pooling)
    expected = F.linear(
        torch.tanh(F.linear(pooled, c.dense.weight, c.dense.bias)), c.out_proj.weight, c.out_proj.bias
    )
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-6)


def test_sequence_classification_losses():
    ids, mask = batch()
    # single label: integer labels, num_labels > 1
    model = make(FAT5ForSequenceClassification, num_labels=4)
    labels = torch.tensor([0, 3, 1])
    out = model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    # multi label: float labels
    multi = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]])
    out = model(ids, attention_mask=mask, labels=multi)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, multi))
    # regression: one label
    model = make(FAT5ForSequenceClassification, num_labels=1)
    target = torch.tensor([0.5, -1.0, 2.0])
    out = model(ids, attention_mask=mask, labels=target)
    assert out.logits.shape == (3, 1)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits[:, 0], target))
    # explicit problem_type wins over inference from dtype
    model = make(FAT5ForSequenceClassification, num_labels=2, problem_type="regression")
    target = torch.randn(3, 2)
    out = model(ids, attention_mask=mask, labels=target)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits, target))


@pytest.mark.parametrize("pooling", ["mean", "first", "eos"])
@pytest.mark.parametrize("position_encoding", ["t5", "rope", "alibi", "fire", "none"])
def test_sequence_classification_padding_invariance(pooling, position_encoding):
    model = make(
        FAT5ForSequenceClassification, num_labels=3, pooling=pooling, position_encoding=position_encoding
    )
    ids, mask = batch()
    ref = model(ids, attention_mask=mask).logits
    # other tokens in the padded positions change nothing
    noisy = torch.where(mask.bool(), ids, torch.randint(2, V, ids.shape))
    torch.testing.assert_close(model(noisy, attention_mask=mask).logits, ref, rtol=0, atol=1e-6)
    # nor does more padding, nor batching: each row alone, unpadded, gives the same logits
    longer = F.pad(noisy, (0, 4), value=7)
    longer_mask = F.pad(mask, (0, 4), value=0)
    torch.testing.assert_close(model(longer, attention_mask=longer_mask).logits, ref, rtol=0, atol=1e-5)
    for i in range(3):
        n = int(mask[i].sum())
        alone = model(ids[i : i + 1, :n]).logits
        torch.testing.assert_close(alone, ref[i : i + 1], rtol=0, atol=1e-5)


def test_return_dict_false_gives_tuple():
    model = make(FAT5ForSequenceClassification, num_labels=2)
    ids, mask = batch()
    labels = torch.tensor([0, 1, 1])
    loss, logits = model(ids, attention_mask=mask, labels=labels, return_dict=False)
    out = model(ids, attention_mask=mask, labels=labels)
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits)


def test_clear_errors():
    model = make(FAT5ForSequenceClassification, num_labels=2)
    ids, mask = batch()
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids, attention_mask=mask, segment_ids=torch.ones_like(ids))
    with pytest.raises(ValueError, match="attention weights"):
        model(ids, output_attentions=True)
    with pytest.raises(TypeError, match="decoder_input_ids"):
        model(ids, decoder_input_ids=ids)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.shared(ids))
    with pytest.raises(ValueError, match="unknown pooling"):
        tiny(pooling="max")


def test_inputs_embeds_equals_input_ids():
    model = make(FAT5ForTokenClassification, num_labels=3)
    ids, mask = batch()
    a = model(ids, attention_mask=mask).logits
    b = model(inputs_embeds=model.shared(ids), attention_mask=mask).logits
    assert torch.equal(a, b)


# ---------------------------------------------------------------- token classification


def test_token_classification():
    model = make(FAT5ForTokenClassification, num_labels=5)
    ids, mask = batch()
    labels = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    labels[0, 0] = -100
    out = model(ids, attention_mask=mask, labels=labels)
    assert isinstance(out, TokenClassifierOutput)
    assert out.logits.shape == (3, 9, 5)
    h = hidden(model, ids, mask)
    torch.testing.assert_close(out.logits, F.linear(h, model.classifier.weight, model.classifier.bias))
    keep = labels != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[keep], labels[keep]))
    with pytest.raises(ValueError, match="labels have shape"):
        model(ids, attention_mask=mask, labels=labels[:, :4])


def test_token_classification_packed_segments():
    model = make(FAT5ForTokenClassification, num_labels=3)
    a, b = torch.randint(2, V, (1, 4)), torch.randint(2, V, (1, 5))
    packed = model(torch.cat([a, b], 1), segment_ids=torch.tensor([[1] * 4 + [2] * 5])).logits
    torch.testing.assert_close(packed[:, :4], model(a).logits, rtol=0, atol=1e-5)
    # T5 buckets are relative, so the second document does not see its shift either
    torch.testing.assert_close(packed[:, 4:], model(b).logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- question answering


def test_question_answering():
    model = make(FAT5ForQuestionAnswering)
    ids, mask = batch()
    out = model(ids, attention_mask=mask)
    assert isinstance(out, QuestionAnsweringModelOutput) and out.loss is None
    assert out.start_logits.shape == out.end_logits.shape == (3, 9)
    h = hidden(model, ids, mask)
    both = F.linear(h, model.qa_outputs.weight, model.qa_outputs.bias)
    torch.testing.assert_close(out.start_logits, both[..., 0])
    torch.testing.assert_close(out.end_logits, both[..., 1])
    # the last example's answer was truncated away (position past the end): ignored, as in transformers
    start, end = torch.tensor([1, 0, 40]), torch.tensor([[3], [2], [50]])
    out = model(ids, attention_mask=mask, start_positions=start, end_positions=end)
    expected = (
        F.cross_entropy(out.start_logits[:2], start[:2]) + F.cross_entropy(out.end_logits[:2], end[:2, 0])
    ) / 2
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="both start_positions and end_positions"):
        model(ids, start_positions=start)


# ---------------------------------------------------------------- init


@pytest.mark.parametrize(
    "cls", [FAT5ForSequenceClassification, FAT5ForTokenClassification, FAT5ForQuestionAnswering]
)
def test_head_init(cls):
    torch.manual_seed(0)
    model = cls(tiny(d_model=256, d_kv=16, d_ff=32, num_layers=1, num_labels=64))
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and getattr(m, "_fat5_head", False)]
    assert heads
    for lin in heads:
        assert lin.bias is not None and torch.equal(lin.bias, torch.zeros_like(lin.bias))
        if lin.weight.numel() >= 2000:
            assert abs(lin.weight.std().item() - 256**-0.5) < 0.1 * 256**-0.5
    assert abs(model.shared.weight.std().item() - 1.0) < 0.05


def test_train_mode_dropout_and_eval_determinism():
    model = make(FAT5ForSequenceClassification, num_labels=2, classifier_dropout=0.5)
    ids, mask = batch()
    model.eval()
    assert torch.equal(model(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    model.train()
    assert not torch.equal(model(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
