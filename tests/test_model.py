"""Model semantics on the reference path: masks, packed documents, positional encodings at offsets, loss."""

import pytest
import torch
import torch.nn.functional as F

from fat5 import PRESETS, FAT5Config, FAT5EncoderModel, FAT5ForConditionalGeneration
from fat5.cache import DynamicCache

ENCODINGS = ["t5", "rope", "alibi", "fire", "none"]


def tiny(pe="t5", **kw):
    cfg = FAT5Config.from_preset(
        "tiny",
        vocab_size=97,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_heads=4,
        position_encoding=pe,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        **kw,
    )
    torch.manual_seed(0)
    return FAT5ForConditionalGeneration(cfg).eval()


def test_presets_build_configs():
    # T5 v1.1 checkpoint shapes: (d_model, d_ff, layers, heads)
    v11 = {"small": (512, 1024, 8, 6), "base": (768, 2048, 12, 12), "large": (1024, 2816, 24, 16),
           "xl": (2048, 5120, 24, 32), "xxl": (4096, 10240, 24, 64)}  # fmt: skip
    for name, shape in v11.items():
        c = FAT5Config.from_preset(name)
        assert (c.d_model, c.d_ff, c.num_layers, c.num_heads) == shape, name
        assert c.num_decoder_layers == c.num_layers and c.d_kv == 64 and c.vocab_size == 32128
        assert c.feed_forward_proj == "gated-gelu" and not c.tie_word_embeddings
    assert set(PRESETS) == {"tiny", "fat5-small", *v11}
    small = FAT5Config.from_preset("fat5-small")
    assert (small.num_layers, small.d_model, small.d_ff, small.num_heads, small.vocab_size) == (
        12,
        512,
        2048,
        8,
        32768,
    )
    FAT5ForConditionalGeneration(FAT5Config.from_preset("tiny"))  # the CPU preset builds


def test_bad_config_names_choices():
    with pytest.raises(ValueError, match="valid choices: t5, rope, alibi, fire, none"):
        FAT5Config(position_encoding="sinusoidal")
    with pytest.raises(ValueError, match="valid choices: relu, gated-gelu"):
        FAT5Config(feed_forward_proj="swish")
    with pytest.raises(ValueError, match="valid presets"):
        FAT5Config.from_preset("huge")


def test_t5_bucket_range_checked():
    """max_distance at or below the exact range would divide by log(<= 1): a clear error, not garbage ids."""
    from fat5.positions import relative_position_bucket

    with pytest.raises(ValueError, match="relative_attention_max_distance"):
        FAT5Config(relative_attention_num_buckets=32, relative_attention_max_distance=16)
    FAT5Config(position_encoding="rope", relative_attention_max_distance=16)  # unused without T5 buckets
    dist = torch.arange(-300, 301)
    with pytest.raises(ValueError, match="must exceed the exact range"):
        relative_position_bucket(dist, False, 32, 16)
    ok = relative_position_bucket(dist, True, 32, 16)  # bidirectional: exact range 8
    assert ok.min() >= 0 and ok.max() <= 31
    hf = relative_position_bucket(dist, False, 32, 128)
    assert (hf[300:] == 0).all() and hf[:300].unique().tolist() == list(range(1, 32))


@pytest.mark.parametrize("pe", ENCODINGS)
def test_padding_content_never_leaks(pe):
    model = tiny(pe)
    ids = torch.randint(2, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    dec = torch.randint(2, 97, (2, 7))
    dmask = torch.ones_like(dec)
    dmask[1, 5:] = 0
    out1 = model(
        input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask
    ).logits
    ids2, dec2 = ids.clone(), dec.clone()
    ids2[0, 6:] = torch.randint(2, 97, (3,))
    dec2[1, 5:] = torch.randint(2, 97, (2,))
    out2 = model(
        input_ids=ids2, attention_mask=mask, decoder_input_ids=dec2, decoder_attention_mask=dmask
    ).logits
    # encoder padding reaches nothing (cross-attention masked); decoder padding reaches no real position
    assert torch.allclose(out1[0], out2[0], atol=1e-6)
    assert torch.allclose(out1[1, :5], out2[1, :5], atol=1e-6)
    enc = FAT5EncoderModel(model.config).eval()
    h1 = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    h2 = enc(input_ids=ids2, attention_mask=mask).last_hidden_state
    assert torch.allclose(h1[0, :6], h2[0, :6], atol=1e-6)


@pytest.mark.parametrize("pe", ENCODINGS)
def test_packed_documents_do_not_interact(pe):
    model = tiny(pe)
    # one row: encoder docs of 5 and 4 tokens, decoder docs of 3 and 4 tokens
    seg = torch.tensor([[1] * 5 + [2] * 4])
    dseg = torch.tensor([[1] * 3 + [2] * 4])
    ids = torch.randint(2, 97, (1, 9))
    dec = torch.randint(2, 97, (1, 7))
    kw = dict(segment_ids=seg, decoder_segment_ids=dseg)
    out1 = model(input_ids=ids, decoder_input_ids=dec, **kw).logits
    ids2, dec2 = ids.clone(), dec.clone()
    ids2[0, 5:] = torch.randint(2, 97, (4,))  # change document 2 everywhere
    dec2[0, 3:] = torch.randint(2, 97, (4,))
    out2 = model(input_ids=ids2, decoder_input_ids=dec2, **kw).logits
    assert torch.allclose(out1[0, :3], out2[0, :3], atol=1e-6)
    assert not torch.allclose(out1[0, 3:], out2[0, 3:], atol=1e-4)
    ids3 = ids.clone()
    ids3[0, :5] = torch.randint(2, 97, (5,))  # change document 1: document 2's decoder must not see it
    out3 = model(input_ids=ids3, decoder_input_ids=dec, **kw).logits
    assert torch.allclose(out1[0, 3:], out3[0, 3:], atol=1e-6)


@pytest.mark.parametrize("pe", ENCODINGS)
def test_decoder_step_at_offset_equals_full_pass(pe):
    model = tiny(pe)
    ids = torch.randint(2, 97, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    dec = torch.randint(2, 97, (2, 6))
    full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    enc = model.encode(ids, mask)
    cache = DynamicCache()
    steps = []
    # a prefix of 2 tokens, then one token at a time
    for lo, hi in [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)]:
        out = model(
            encoder_outputs=(enc,),
            attention_mask=mask,
            decoder_input_ids=dec[:, lo:hi],
            past_key_values=cache,
        )
        steps.append(out.logits)
    inc = torch.cat(steps, dim=1)
    assert (inc - full).abs().max() < 1e-5


def test_loss_is_mean_over_real_labels_with_z_loss_and_smoothing():
    model = tiny("t5", z_loss=1e-3, label_smoothing=0.1)
    ids = torch.randint(2, 97, (2, 8))
    labels = torch.randint(2, 97, (2, 6))
    labels[1, 3:] = -100
    out = model(input_ids=ids, labels=labels)
    logits = out.logits.reshape(-1, 97).double()
    flat = labels.reshape(-1)
    ce = F.cross_entropy(logits, flat, ignore_index=-100, label_smoothing=0.1)
    lse = torch.logsumexp(logits, -1)[flat != -100]
    expected = ce + 1e-3 * lse.pow(2).mean()
    assert abs(out.loss.item() - expected.item()) < 1e-5
    model.train()  # fused path (no logits) gives the same loss
    out2 = model(input_ids=ids, labels=labels)
    assert out2.logits is None and abs(out2.loss.item() - out.loss.item()) < 1e-5


def test_all_labels_ignored_gives_zero_loss():
    model = tiny()
    out = model(input_ids=torch.randint(2, 97, (1, 4)), labels=torch.full((1, 3), -100))
    assert out.loss.item() == 0.0


def test_rope_leaves_values_and_cross_attention_alone():
    from fat5.model import AttentionContext

    model = tiny("rope")
    rope = model.decoder.rope
    # cross-attention: identical query rows at different positions must give identical outputs
    cross = model.decoder.layers[0].cross_attn
    x = torch.randn(1, 1, 32).expand(1, 4, 32).contiguous()
    out = cross(x, AttentionContext(rope=rope, q_offset=3), kv_input=torch.randn(1, 3, 32))
    assert torch.allclose(out[0, 0], out[0, 3], atol=1e-6)
    # values: one token attending to itself outputs o(v(x)) at any position; RoPE on v would move it
    self_attn = model.decoder.layers[0].attn
    one = torch.randn(1, 1, 32)
    at0 = self_attn(one, AttentionContext(rope=rope, q_offset=0))
    at7 = self_attn(one, AttentionContext(rope=rope, q_offset=7))
    assert torch.allclose(at0, at7, atol=1e-6)
    assert torch.allclose(at0, self_attn.o(self_attn.v(one)), atol=1e-6)
