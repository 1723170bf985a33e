"""Shared fixtures for the data-pipeline tests: a small tokenizer and a prepared corpus, made once."""

import pytest

from fat5.data import builtin_corpus, load_tokenizer, prepare, train_tokenizer


@pytest.fixture(scope="session")
def texts():
    return list(builtin_corpus(max_docs=40))


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, texts):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts[:10], 600, out, num_sentinels=100, kind="unigram")
    return out


@pytest.fixture(scope="session")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, texts, tok):
    out = tmp_path_factory.mktemp("prepared")
    prepare(texts[:24], tok, out, val_fraction=0.25, num_workers=1, shard_tokens=20_000)
    return out
