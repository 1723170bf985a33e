import json

import numpy as np
import pytest

from fat5.data import TextSource, TokenDataset, builtin_corpus, prepare


def test_builtin_corpus_deterministic():
    a, b = list(builtin_corpus(max_docs=5)), list(builtin_corpus(max_docs=5))
    assert a == b and len(a) == 5 and all(a)


def test_local_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("para one\nline two\n\n  \npara two\n")
    (tmp_path / "sub" / "b.jsonl").write_text('{"body": "doc b1"}\n\n{"body": "doc b2"}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["pq 1", None, "pq 2"]}), tmp_path / "c.parquet")
    assert list(TextSource(tmp_path / "a.txt")) == ["para one\nline two\n\n  \npara two\n"]
    assert list(TextSource(tmp_path / "a.txt", txt_split="paragraph")) == ["para one\nline two", "para two\n"]
    docs = list(TextSource(tmp_path, text_field="body"))
    assert docs == ["para one\nline two\n\n  \npara two\n", "pq 1", "pq 2", "doc b1", "doc b2"]
    with pytest.raises(ValueError, match=r"b.jsonl:1: no field 'text'"):
        list(TextSource(tmp_path / "sub" / "b.jsonl"))


def test_bad_input(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        TextSource(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        prepare(tmp_path / "missing_dir", tok, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*holds no"):
        TextSource(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(ValueError, match="blank.txt yielded no non-empty document"):
        prepare(tmp_path / "blank.txt", tok, tmp_path / "out2", num_workers=1)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        TokenDataset(tmp_path)


def test_undecodable_bytes_are_counted(tmp_path, tok):
    (tmp_path / "bad.txt").write_bytes(b"good text \xff\xfe more \xc3( end")
    src = TextSource(tmp_path / "bad.txt")
    with pytest.warns(UserWarning, match=r"bad.txt: 3 undecodable byte"):
        docs = list(src)
    assert src.replaced == 3 and docs[0].count("\ufffd") == 3
    with pytest.warns(UserWarning, match="undecodable"):
        man = prepare(tmp_path / "bad.txt", tok, tmp_path / "out", val_fraction=0.0, num_workers=1)
    assert man["stats"]["replaced_bytes"] == 3


def test_prepare_roundtrip_and_workers(tmp_path, texts, tok, data_dir):
    ds, val = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "val")
    man = ds.manifest
    assert man["dtype"] == "uint16" and man["vocab_size"] == len(tok) and len(man["shards"]) > 1
    assert len(ds) + len(val) == 24 and len(val) > 0
    expected = [tok(t, add_special_tokens=False).input_ids for t in texts[:24]]
    got = [ds[i].tolist() for i in range(len(ds))] + [val[i].tolist() for i in range(len(val))]
    assert sorted(map(tuple, got)) == sorted(map(tuple, expected))
    assert ds.num_tokens == sum(map(len, (ds[i] for i in range(len(ds)))))
    assert isinstance(ds[0], np.memmap) or isinstance(ds[0].base, np.memmap)
    other = prepare(texts[:24], tok, tmp_path / "w2", val_fraction=0.25, num_workers=2, shard_tokens=20_000)
    assert other["stats"] == man["stats"]
    for split in ("train", "val"):
        a, b = TokenDataset(data_dir, split), TokenDataset(tmp_path / "w2", split)
        assert all(np.array_equal(a[i], b[i]) for i in range(len(a)))


def test_prepare_resumes(tmp_path, texts, tok, data_dir):
    out = tmp_path / "resume"
    full = prepare(texts[:24], tok, out, val_fraction=0.25, num_workers=1, shard_tokens=20_000)
    # Simulate a crash after the first shard: later shards unrecorded, their files half-written.
    man = json.loads((out / "manifest.json").read_text())
    man["shards"], man["complete"] = man["shards"][:1], False
    (out / "manifest.json").write_text(json.dumps(man))
    (out / "train-00001.bin").write_bytes(b"garbage")
    first = (out / "train-00000.bin").stat().st_mtime_ns
    with pytest.raises(ValueError, match="only partly prepared"):
        TokenDataset(out)
    again = prepare(texts[:24], tok, out, val_fraction=0.25, num_workers=1, shard_tokens=20_000)
    assert again["stats"] == full["stats"] and (out / "train-00000.bin").stat().st_mtime_ns == first
    a, b = TokenDataset(out), TokenDataset(data_dir)
    assert len(a) == len(b) and all(np.array_equal(a[i], b[i]) for i in range(len(a)))
    with pytest.raises(ValueError, match="different settings"):
        prepare(texts[:24], tok, out, val_fraction=0.5, num_workers=1)


def test_check_vocab(data_dir, tok):
    ds = TokenDataset(data_dir)
    ds.check_vocab(len(tok))
    with pytest.raises(ValueError, match=f"has {len(tok)} tokens .* set the model's vocab_size"):
        ds.check_vocab(len(tok) - 1)
    with pytest.raises(ValueError, match="holds token id"):
        ds.check_vocab(100)


def test_hf_dataset_on_disk(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["first doc here", "", "second doc"]}).save_to_disk(tmp_path / "hf")
    assert list(TextSource(tmp_path / "hf")) == ["first doc here", "second doc"]
    man = prepare(tmp_path / "hf", tok, tmp_path / "out", val_fraction=0.0, num_workers=1)
    assert man["stats"]["train_docs"] == 2
