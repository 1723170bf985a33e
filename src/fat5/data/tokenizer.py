"""Train and load T5-style tokenizers.

``train_tokenizer`` learns a subword vocabulary with the Hugging Face ``tokenizers`` library, either a
SentencePiece-style unigram model (what T5 / mT5 / UL2 use) or a byte-fallback BPE (no ``<unk>`` ever: an
unseen character becomes its UTF-8 bytes ``<0x..>``). Both split on spaces with the SentencePiece
``▁`` metaspace convention, so text round-trips through ``decode``.

Id layout, matching T5 so that a T5 config works unchanged::

    0 <pad>   (also the decoder start token)
    1 </s>    (eos, appended on every encode, like T5TokenizerFast)
    2 <unk>
    3 ...     learned pieces (``vocab_size`` pieces in all, counting the three above; BPE: + 256 bytes)
    then      <extra_id_0> ... <extra_id_{n-1}>   span-corruption sentinels
    then      [R] [S] [X]                          UL2 mode tokens
    then      <unused_0> ...                       padding so that len(tokenizer) % 128 == 0

Sentinels and mode tokens are *special* added tokens: they always encode as a single id, even inside text.
Unlike T5 the sentinels count up (``<extra_id_0>`` has the smallest id); code must use ``sentinel_ids``
rather than assuming ``vocab - 1 - i``.

``load_tokenizer`` also accepts a stock Hugging Face T5 tokenizer folder (``tokenizer.json`` or
``spiece.model``); such a tokenizer has sentinels but no mode tokens, so only mixtures without mode tokens
(e.g. ``Mixture.t5()``) run with it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
MODE_TOKENS = ("[R]", "[S]", "[X]")
VOCAB_MULTIPLE = 128


def sentinel_token(i: int) -> str:
    return f"<extra_id_{i}>"


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike,
    num_sentinels: int = 100,
    kind: str = "unigram",
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on ``texts`` and save it as a ``transformers`` folder in ``out_dir``.

    ``vocab_size`` counts the learned pieces including ``<pad> </s> <unk>`` (and, for BPE, the 256 byte
    tokens); sentinels, mode tokens and the padding to a multiple of 128 come on top, so
    ``len(tokenizer) >= vocab_size``. The trainer may learn fewer pieces than asked on a tiny corpus.
    """
    if kind not in ("unigram", "bpe"):
        raise ValueError(f"unknown tokenizer kind {kind!r}: use 'unigram' or 'bpe'")
    if num_sentinels < 0:
        raise ValueError(f"num_sentinels must be >= 0, got {num_sentinels}")
    min_size = 3 + (256 if kind == "bpe" else 0) + 1
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size} is too small for a {kind} tokenizer (minimum {min_size})")

    count = [0]

    def _counted(it: Iterable[str]):
        for t in it:
            if t:
                count[0] += 1
                yield t

    specials = [PAD, EOS, UNK]
    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token=UNK, show_progress=False
        )
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(_counted(texts), trainer)
    else:
        tok = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False
        )
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.train_from_iterator(_counted(texts), trainer)
        tok = _add_byte_tokens(tok)
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    if count[0] == 0:
        raise ValueError("cannot train a tokenizer on an empty corpus (no non-empty text was given)")
    for i, t in enumerate(specials):
        assert tok.token_to_id(t) == i, f"{t} should have id {i}"

    extra = [sentinel_token(i) for i in range(num_sentinels)] + list(MODE_TOKENS)
    n = tok.get_vocab_size() + len(extra)
    extra += [f"<unused_{i}>" for i in range(-n % VOCAB_MULTIPLE)]
    tok.add_special_tokens(extra)
    # T5 appends eos to every sequence; pairs get one eos each.
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens=[sentinel_token(i) for i in range(num_sentinels)] + list(MODE_TOKENS),
        model_max_length=1_000_000,
    )
    fast.save_pretrained(str(out_dir))
    assert len(fast) % VOCAB_MULTIPLE == 0
    return fast


def _add_byte_tokens(tok: Tokenizer) -> Tokenizer:
    # BpeTrainer does not create the <0xXX> tokens that byte_fallback needs; append any missing ones.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return Tokenizer.from_str(json.dumps(spec))


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a fat5 tokenizer folder or a Hugging Face T5 tokenizer folder (tokenizer.json / spiece.model)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer folder not found: {p}")
    if p.is_file() and p.name == "tokenizer.json":
        p = p.parent
    if not ((p / "tokenizer.json").exists() or (p / "spiece.model").exists()):
        raise FileNotFoundError(
            f"{p} is not a tokenizer folder: it has neither tokenizer.json nor spiece.model "
            "(train one with `fat5 tokenizer train`)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError, TypeError):
        if (p / "tokenizer_config.json").exists() or not (p / "spiece.model").exists():
            raise
    # A bare spiece.model without a config: the T5 convention (100 sentinels appended by transformers).
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(str(p))


def sentinel_ids(tok: PreTrainedTokenizerBase, needed: int | None = None) -> list[int]:
    """Ids of ``<extra_id_0>, <extra_id_1>, ...`` (in that order) present in ``tok``.

    Raises when the tokenizer has no sentinels, or fewer than ``needed``.
    """
    vocab = tok.get_vocab()
    ids = []
    while sentinel_token(len(ids)) in vocab:
        ids.append(vocab[sentinel_token(len(ids))])
    if not ids:
        raise ValueError(
            "the tokenizer has no sentinel tokens (<extra_id_0>, ...), which span corruption needs: "
            "train one with `fat5 tokenizer train --num-sentinels 100` or add them with "
            "tok.add_special_tokens({'additional_special_tokens': [...]})"
        )
    if needed is not None and len(ids) < needed:
        raise ValueError(
            f"the tokenizer has {len(ids)} sentinel tokens but {needed} are needed: retrain it with "
            f"--num-sentinels {needed} or use shorter sequences / longer mean spans"
        )
    return ids


def mode_token_ids(tok: PreTrainedTokenizerBase, tokens: Iterable[str] = MODE_TOKENS) -> dict[str, int]:
    """Ids of the UL2 mode tokens (``[R] [S] [X]`` by default); raises naming any that is missing."""
    vocab = tok.get_vocab()
    tokens = list(tokens)
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise ValueError(
            f"the tokenizer lacks the UL2 mode token(s) {missing}: train one with `fat5 tokenizer train`, "
            "add them as special tokens, or use a mixture without mode tokens (Mixture.t5())"
        )
    return {t: vocab[t] for t in tokens}


def tokenizer_hash(tok: PreTrainedTokenizerBase) -> str:
    """A short content hash identifying the tokenizer (vocabulary, merges, normalisation, specials)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
