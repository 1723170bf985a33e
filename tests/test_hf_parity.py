"""Converted tiny random transformers T5 / mT5 models match transformers exactly (fp32, CPU)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import MT5Config, MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration

from fat5 import FAT5ForConditionalGeneration
from fat5.hf import convert_from_hf, convert_to_hf, load_hf_t5, read_state_dict

VARIANTS = {
    # T5 v1.0: ReLU, tied embeddings with the d_model**-0.5 output rescaling
    "t5-v1.0": (
        T5Config,
        T5ForConditionalGeneration,
        dict(feed_forward_proj="relu", tie_word_embeddings=True),
    ),
    # T5 v1.1 / FLAN-T5: gated-gelu, untied
    "t5-v1.1": (
        T5Config,
        T5ForConditionalGeneration,
        dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    ),
    "mt5": (
        MT5Config,
        MT5ForConditionalGeneration,
        dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    ),
    # encoder and decoder of different depths
    "t5-deep-enc": (
        T5Config,
        T5ForConditionalGeneration,
        dict(feed_forward_proj="gated-silu", tie_word_embeddings=False, num_layers=3, num_decoder_layers=1),
    ),
}


def make_hf(variant: str):
    cfg_cls, model_cls, extra = VARIANTS[variant]
    kw = dict(
        vocab_size=101,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    kw.update(extra)
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**kw)).eval()
    if not extra["tie_word_embeddings"]:
        # transformers >= 5 ties lm_head to shared at init even for v1.1; real v1.1 checkpoints are untied
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    with torch.no_grad():  # layer norms start at 1: make them informative
        for n, p in model.named_parameters():
            if "layer_norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 101, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = torch.randint(2, 101, (3, 6), generator=g)
    dmask = torch.ones_like(labels)
    dmask[2, 4:] = 0
    labels = labels.masked_fill(dmask == 0, -100)
    return ids, mask, labels, dmask


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_loss_and_grads_match(tmp_path, variant):
    hf = make_hf(variant)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_t5(tmp_path / "hf").eval()
    ids, mask, labels, dmask = batch()
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dmask)
    out_hf = hf(**kw)
    out = ours(**kw)
    assert rel_err(out.logits, out_hf.logits) < 1e-5
    assert abs(out.loss.item() - out_hf.loss.item()) / out_hf.loss.item() < 1e-5
    out_hf.loss.backward()
    out.loss.backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    from fat5.hf import fat5_to_hf_name

    checked = 0
    for n, p in ours.named_parameters():
        g_hf = hf_grads[fat5_to_hf_name(n)]
        assert p.grad is not None, n
        assert rel_err(p.grad, g_hf) < 1e-4, n
        checked += 1
    assert checked == len(list(ours.parameters()))


@pytest.mark.parametrize("variant", ["t5-v1.0", "t5-v1.1", "mt5"])
def test_round_trip_is_exact(tmp_path, variant):
    hf = make_hf(variant)
    hf.save_pretrained(tmp_path / "hf")
    convert_from_hf(tmp_path / "hf", tmp_path / "fat5")
    convert_to_hf(tmp_path / "fat5", tmp_path / "back")
    a, b = read_state_dict(tmp_path / "hf"), load_file(str(tmp_path / "back" / "model.safetensors"))
    for name, t in a.items():
        if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            continue
        assert torch.equal(t, b[name]), name
    # and plain transformers loads the export with identical outputs
    back = T5ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    ids, mask, labels, dmask = batch()
    with torch.no_grad():
        assert torch.allclose(
            back(input_ids=ids, attention_mask=mask, labels=labels).logits,
            hf(input_ids=ids, attention_mask=mask, labels=labels).logits,
            atol=1e-6,
        )


def test_sharded_and_bin_checkpoints(tmp_path):
    hf = make_hf("t5-v1.1")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    m1 = load_hf_t5(tmp_path / "sharded")
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(hf.state_dict(), binary / "pytorch_model.bin")
    (binary / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    m2 = load_hf_t5(binary)
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_fat5_save_pretrained_round_trip(tmp_path):
    hf = make_hf("t5-v1.0")
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_t5(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "f")
    assert (tmp_path / "f" / "model.safetensors").exists()
    again = FAT5ForConditionalGeneration.from_pretrained(tmp_path / "f")
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_foreign_checkpoint_names_weights(tmp_path):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(
        ValueError, match=r"Unexpected weights: .*transformer\.h\.0.*Missing weights: .*shared\.weight"
    ):
        load_hf_t5(tmp_path / "gpt2")
    BertModel(
        BertConfig(
            num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=50
        )
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"Unexpected weights: .*embeddings.*Missing weights"):
        load_hf_t5(tmp_path / "bert")


def test_vocab_mismatch_is_reported(tmp_path):
    hf = make_hf("t5-v1.1")
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["vocab_size"] = 200
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="vocab_size does not match"):
        load_hf_t5(tmp_path / "hf")


def test_export_refuses_non_t5_positions(tmp_path):
    from fat5 import FAT5Config
    from fat5.hf import save_hf_t5

    m = FAT5ForConditionalGeneration(FAT5Config.from_preset("tiny", position_encoding="rope"))
    with pytest.raises(ValueError, match="position_encoding='rope'"):
        save_hf_t5(m, tmp_path / "x")
