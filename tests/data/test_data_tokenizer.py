import numpy as np
import pytest
from transformers import AutoTokenizer

from fat5.data import (
    Mixture,
    TokenDataset,
    UL2Batches,
    load_tokenizer,
    mode_token_ids,
    sentinel_ids,
    train_tokenizer,
)


def test_special_tokens_and_size(tok, tok_dir):
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) % 128 == 0
    for t in ["[R]", "[S]", "[X]", "<extra_id_0>", "<extra_id_99>"]:
        ids = tok(t, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] >= 3, t
    ids = tok("hello world").input_ids
    assert ids[-1] == 1 and ids.count(1) == 1  # eos appended like T5
    sent = sentinel_ids(tok)
    assert len(sent) == 100 and sent[0] == tok.convert_tokens_to_ids("<extra_id_0>")
    assert set(mode_token_ids(tok)) == {"[R]", "[S]", "[X]"}
    auto = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(auto) == len(tok)
    assert auto("def f(x): [X] <extra_id_3>").input_ids == tok("def f(x): [X] <extra_id_3>").input_ids


def test_bpe_byte_fallback(tmp_path, texts):
    tok = train_tokenizer(texts[:10], 400, tmp_path, num_sentinels=3, kind="bpe")
    assert len(tok) % 128 == 0
    s = "def naïve(x):  # 漢字 ☃"
    ids = tok(s, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == s
    assert load_tokenizer(tmp_path)("[S]", add_special_tokens=False).input_ids == [
        tok.convert_tokens_to_ids("[S]")
    ]


def test_sentinel_errors(tmp_path, texts, data_dir):
    none = train_tokenizer(texts[:3], 300, tmp_path / "none", num_sentinels=0)
    with pytest.raises(ValueError, match="no sentinel"):
        sentinel_ids(none)
    few = train_tokenizer(texts[:3], 300, tmp_path / "few", num_sentinels=4)
    assert len(sentinel_ids(few)) == 4
    with pytest.raises(ValueError, match="4 sentinel tokens but 10 are needed"):
        sentinel_ids(few, needed=10)
    ds = TokenDataset(data_dir)
    with pytest.raises(ValueError, match="no sentinel"):
        UL2Batches(ds, none, Mixture.t5(), enc_len=64, dec_len=64)
    with pytest.raises(ValueError, match="another tokenizer"):
        UL2Batches(ds, few, Mixture.t5(), enc_len=64, dec_len=64)
    # with few sentinels the span-corruption pieces get shorter instead of reusing sentinels
    from fat5.data import max_piece_length

    d = Mixture.t5().denoisers[0]
    assert max_piece_length(d, 512, 512, 4) < 100 < max_piece_length(d, 512, 512, 100)


def test_missing_mode_tokens(tok):
    with pytest.raises(ValueError, match=r"lacks the UL2 mode token\(s\) \['\[Q\]'\]"):
        mode_token_ids(tok, ["[R]", "[Q]"])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor spiece.model"):
        load_tokenizer(tmp_path)


def test_sentencepiece_folder(tmp_path, texts):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text("\n".join(t for t in texts[:5]))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"),
        model_prefix=str(tmp_path / "spiece"),
        vocab_size=300,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_id == 1
    sent = sentinel_ids(tok)
    assert len(sent) == 100 and len(set(sent)) == 100
    assert np.all(np.array(sent) >= 300)
    # a stock T5 tokenizer has sentinels but no mode tokens: UL2 needs them, plain T5 does not
    with pytest.raises(ValueError, match="mode token"):
        mode_token_ids(tok)
    prep = tmp_path / "prep"
    from fat5.data import prepare

    prepare(texts[:5], tok, prep, val_fraction=0.0, num_workers=1)
    ds = TokenDataset(prep)
    with pytest.raises(ValueError, match="mode token"):
        UL2Batches(ds, tok, Mixture.ul2(), enc_len=64, dec_len=64)
    batch = next(iter(UL2Batches(ds, tok, Mixture.t5(), enc_len=64, dec_len=32, batch_size=2)))
    assert batch["input_ids"].shape == (2, 64)
