"""Auto-class registration: saved fat5 folders load through every Auto class, without trust_remote_code,
as the right class and with every tensor (and every non-persistent buffer) intact."""

import json

import pytest
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTextEncoding,
    AutoModelForTokenClassification,
)

import fat5.auto
from fat5 import FAT5Config, FAT5EncoderModel, FAT5ForConditionalGeneration
from fat5.heads import FAT5ForQuestionAnswering, FAT5ForSequenceClassification, FAT5ForTokenClassification

fat5.auto.register()
fat5.auto.register()  # idempotent

V = 128
CASES = [
    (AutoModel, FAT5EncoderModel),
    (AutoModelForTextEncoding, FAT5EncoderModel),
    (AutoModelForSeq2SeqLM, FAT5ForConditionalGeneration),
    (AutoModelForSequenceClassification, FAT5ForSequenceClassification),
    (AutoModelForTokenClassification, FAT5ForTokenClassification),
    (AutoModelForQuestionAnswering, FAT5ForQuestionAnswering),
]


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
        num_decoder_layers=1,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        num_labels=3,
    )
    return FAT5Config.from_preset("tiny", **{**base, **kw})


def randomized(model):
    # every tensor distinct from any init value, so a reload that re-initialises anything is caught
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1.0, 1.0)
    return model.eval()


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module, only_prefixes=None):
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if only_prefixes is None or k.startswith(only_prefixes)]
    if only_prefixes is None:
        assert set(sa) == set(sb)
    for k in keys:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), f"{k} changed in the save/load round trip"


def test_register_is_idempotent_and_config_maps():
    fat5.auto.register()
    cfg = AutoConfig.for_model("fat5", d_model=48)
    assert type(cfg) is FAT5Config and cfg.d_model == 48


@pytest.mark.parametrize("auto_cls,cls", CASES, ids=[c.__name__ for c, _ in CASES])
def test_auto_round_trip(auto_cls, cls, tmp_path):
    model = randomized(cls(tiny()))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "fat5" and saved["architectures"] == [cls.__name__]
    assert "auto_map" not in saved  # nothing for trust_remote_code to fetch

    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is FAT5Config
    loaded = auto_cls.from_pretrained(tmp_path, trust_remote_code=False)
    assert type(loaded) is cls
    assert_same_tensors(model, loaded)
    assert type(auto_cls.from_config(config)) is cls


@pytest.mark.parametrize("position_encoding", ["t5", "rope", "alibi", "fire", "none"])
def test_round_trip_outputs_every_position_encoding(position_encoding, tmp_path):
    """Non-persistent buffers (RoPE inv_freq, ALiBi slopes) are not in the file: they must be rebuilt."""
    model = randomized(FAT5ForConditionalGeneration(tiny(position_encoding=position_encoding)))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert_same_tensors(model, loaded)
    for (name, a), (_, b) in zip(model.named_buffers(), loaded.named_buffers()):
        assert torch.equal(a, b), f"buffer {name} differs after loading"
    ids = torch.randint(2, V, (2, 7))
    with torch.no_grad():
        assert torch.equal(
            model(ids, decoder_input_ids=ids).logits, loaded(ids, decoder_input_ids=ids).logits
        )


@pytest.mark.parametrize("source", [FAT5EncoderModel, FAT5ForConditionalGeneration])
@pytest.mark.parametrize("auto_cls,cls", CASES[3:], ids=[c.__name__ for c, _ in CASES[3:]])
def test_head_from_pretrained_backbone(source, auto_cls, cls, tmp_path):
    """Fine-tuning start: a pretrained encoder (or seq2seq) folder into a task head, head freshly initialised."""
    backbone = randomized(source(tiny()))
    backbone.save_pretrained(tmp_path)
    head = auto_cls.from_pretrained(tmp_path)
    assert type(head) is cls
    assert_same_tensors(backbone, head, only_prefixes=("shared.", "encoder."))
    fresh = [m for m in head.modules() if isinstance(m, torch.nn.Linear) and getattr(m, "_fat5_head", False)]
    assert fresh
    for lin in fresh:
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
        assert 0 < lin.weight.std().item() < 2 * 32**-0.5  # d_model**-0.5 init, not left uninitialised


def test_dtype_round_trip(tmp_path):
    model = randomized(FAT5ForSequenceClassification(tiny())).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert_same_tensors(model, loaded)
