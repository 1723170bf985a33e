"""Text sources, and pretokenised token shards that training reads through ``np.memmap``.

Sources (``open_source``):

* ``"builtin"`` (or ``None``): real text every Python installation carries — the standard library's
  ``.py`` files (code, comments and docstrings) under ``sysconfig.get_paths()["stdlib"]``, minus
  ``site-packages`` and the test suites (which hold deliberately mis-encoded files). **One document per
  module**, in sorted path order, so the corpus is deterministic for a given Python version (about 12 MB
  for CPython 3.11). Long modules are cut into pieces later, by the UL2 collator.
* local files or folders (searched recursively, sorted): ``.txt`` (one document per file by default, or
  one per blank-line-separated paragraph with ``txt_split="paragraph"``), ``.jsonl`` (one JSON object a
  line, text in field ``text_field``), ``.parquet`` (column ``text_field``).
* a Hugging Face dataset: ``"hf:NAME"`` or ``"hf:NAME:CONFIG"`` through ``datasets.load_dataset``
  (``streaming=True`` avoids downloading it whole), or a folder written by ``Dataset.save_to_disk``.

Undecodable bytes are replaced by U+FFFD and counted (one warning per file, total in
``TextSource.replaced``); they never crash the run. A missing path or a source that yields no document
raises an error naming it.

``prepare`` tokenises a source in parallel worker processes (ordered ``Pool.imap``, so the output does not
depend on the number of workers) and writes, per shard ``k`` and split ``train``/``val``:
``{split}-{k:05d}.bin`` (the documents' token ids back to back, uint16 when the vocabulary fits, else
uint32, no eos: the denoisers add it) and ``{split}-{k:05d}.idx.npy`` (int64 document offsets, one more than
documents), plus ``manifest.json`` (tokenizer hash and size, dtype, counts, finished shards). A document
goes to ``val`` when a hash of its text falls below ``val_fraction``, so the split does not depend on order.
The manifest is rewritten atomically after every shard, and a rerun skips the documents of finished shards
(resume). ``TokenDataset`` reads one split back as zero-copy numpy views.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from .tokenizer import load_tokenizer, tokenizer_hash

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


# ----------------------------------------------------------------------------------------------- sources
def _decode(data: bytes, where: str, counter: list[int]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        n = text.count("\ufffd") - data.count("\ufffd".encode())
        counter[0] += n
        warnings.warn(f"{where}: {n} undecodable byte sequence(s) replaced with U+FFFD", stacklevel=3)
        return text


def _builtin_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def builtin_corpus(max_docs: int | None = None) -> TextSource:
    """The standard library's modules as documents (one per ``.py`` file, sorted by path); re-iterable."""
    return TextSource("builtin", max_docs=max_docs)


class TextSource:
    """An iterable of documents (``str``) from one source; see the module docstring for the kinds.

    ``replaced`` counts undecodable byte sequences replaced so far; ``docs`` the documents yielded.
    """

    def __init__(
        self,
        source: str | os.PathLike | None = "builtin",
        text_field: str = "text",
        txt_split: str = "file",
        streaming: bool = False,
        split: str = "train",
        max_docs: int | None = None,
    ):
        if txt_split not in ("file", "paragraph"):
            raise ValueError(f"txt_split must be 'file' or 'paragraph', got {txt_split!r}")
        self.source = "builtin" if source is None else str(source)
        self.text_field, self.txt_split, self.streaming, self.split = text_field, txt_split, streaming, split
        self.max_docs = max_docs
        self.replaced = 0
        self.docs = 0
        self._kind, self._files = self._resolve()

    def __repr__(self) -> str:
        return f"TextSource({self.source!r})"

    def _resolve(self) -> tuple[str, list[Path]]:
        if self.source == "builtin":
            return "builtin", _builtin_files()
        if self.source.startswith("hf:"):
            return "hf", []
        p = Path(self.source).expanduser()
        if not p.exists():
            raise FileNotFoundError(
                f"corpus source not found: {p} (for a Hugging Face Hub dataset write hf:{self.source})"
            )
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            return "hf_disk", []
        if p.is_file():
            if p.suffix not in _TEXT_SUFFIXES:
                raise ValueError(f"{p}: unsupported file type {p.suffix!r} (use one of {_TEXT_SUFFIXES})")
            return "files", [p]
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"{p}: folder holds no {'/'.join(_TEXT_SUFFIXES)} files")
        return "files", files

    def __iter__(self) -> Iterator[str]:
        self.docs = 0
        counter = [0]
        for text in self._iter_raw(counter):
            self.replaced = counter[0]
            if self.max_docs is not None and self.docs >= self.max_docs:
                return
            self.docs += 1
            yield text
        self.replaced = counter[0]

    def _iter_raw(self, counter: list[int]) -> Iterator[str]:
        if self._kind in ("hf", "hf_disk"):
            yield from self._iter_hf()
            return
        for f in self._files:
            if f.suffix == ".py" or f.suffix == ".txt":
                text = _decode(f.read_bytes(), str(f), counter)
                if self.txt_split == "paragraph" and f.suffix == ".txt":
                    yield from (t for t in re.split(r"\n(?:[ \t\r\f\v]*\n)+", text) if t.strip())
                elif text.strip():
                    yield text
            elif f.suffix == ".jsonl":
                yield from self._iter_jsonl(f, counter)
            else:
                yield from self._iter_parquet(f)

    def _iter_jsonl(self, f: Path, counter: list[int]) -> Iterator[str]:
        with open(f, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(_decode(line, f"{f}:{lineno}", counter))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{lineno}: not valid JSON ({e})") from None
                yield self._field(obj, f"{f}:{lineno}")

    def _iter_parquet(self, f: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        if self.text_field not in pf.schema_arrow.names:
            raise ValueError(f"{f}: no column {self.text_field!r} (columns: {pf.schema_arrow.names})")
        for batch in pf.iter_batches(columns=[self.text_field]):
            yield from (t for t in batch.column(0).to_pylist() if t)

    def _field(self, obj, where: str) -> str:
        if not isinstance(obj, dict) or self.text_field not in obj:
            keys = list(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{where}: no field {self.text_field!r} (found {keys}); set text_field")
        text = obj[self.text_field]
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {self.text_field!r} is {type(text).__name__}, not a string")
        return text

    def _iter_hf(self) -> Iterator[str]:
        import datasets

        if self._kind == "hf_disk":
            ds = datasets.load_from_disk(self.source)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[self.split]
        else:
            name, _, config = self.source[3:].partition(":")
            ds = datasets.load_dataset(name, config or None, split=self.split, streaming=self.streaming)
        for i, row in enumerate(ds):
            text = self._field(row, f"{self.source} row {i}")
            if text:
                yield text


def open_source(source, **kwargs) -> TextSource:
    """``source`` as a ``TextSource``; an existing ``TextSource`` or any iterable of strings passes through."""
    if isinstance(source, TextSource) or (
        source is not None and not isinstance(source, (str, os.PathLike)) and isinstance(source, Iterable)
    ):
        return source
    return TextSource(source, **kwargs)


# ----------------------------------------------------------------------------------------- pretokenising
_worker_tok = None


def _init_worker(tok) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _worker_tok = tok
    if hasattr(tok, "encode_special_tokens"):
        # Text that happens to contain "[S]" or "<extra_id_0>" must not turn into control tokens.
        tok.encode_special_tokens = True


def _encode_chunk(args):
    texts, val_threshold, dtype = args
    if hasattr(_worker_tok, "encode_batch"):  # a `tokenizers.Tokenizer`
        seqs = [e.ids for e in _worker_tok.encode_batch(texts, add_special_tokens=False)]
    else:  # a slow (sentencepiece) transformers tokenizer
        seqs = _worker_tok(texts, add_special_tokens=False)["input_ids"]
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    ids = np.fromiter((i for s in seqs for i in s), dtype=np.int64, count=int(lengths.sum()))
    is_val = np.array([_val_hash(t) < val_threshold for t in texts], dtype=bool)
    nbytes = sum(len(t.encode()) for t in texts)
    max_id = int(ids.max()) if ids.size else -1
    return ids.astype(dtype), lengths, is_val, nbytes, max_id


def _val_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _chunks(texts: Iterable[str], n: int) -> Iterator[list[str]]:
    buf = []
    for t in texts:
        buf.append(t)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class _ShardWriter:
    def __init__(self, out: Path, index: int, dtype):
        self.out, self.index, self.dtype = out, index, dtype
        self.files = {s: open(out / f"{s}-{index:05d}.bin", "wb") for s in ("train", "val")}
        self.lengths = {"train": [], "val": []}
        self.tokens = self.text_bytes = self.empty_docs = 0
        self.max_token_id = -1

    def add(self, ids: np.ndarray, lengths: np.ndarray, is_val: np.ndarray) -> None:
        offs = np.concatenate([[0], np.cumsum(lengths)])
        for split, sel in (("train", ~is_val), ("val", is_val)):
            if sel.any():
                keep = np.repeat(sel, lengths)
                self.files[split].write(ids[keep].tobytes())
                self.lengths[split].append(lengths[sel])
        self.tokens += int(offs[-1])

    def close(self) -> dict:
        rec = {
            "index": self.index,
            "text_bytes": self.text_bytes,
            "empty_docs": self.empty_docs,
            "max_token_id": self.max_token_id,
        }
        for split, fh in self.files.items():
            fh.close()
            lens = np.concatenate(self.lengths[split]) if self.lengths[split] else np.zeros(0, np.int64)
            offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
            np.save(self.out / f"{split}-{self.index:05d}.idx.npy", offsets)
            rec[split] = {"docs": int(lens.size), "tokens": int(offsets[-1])}
        return rec


def prepare(
    source,
    tokenizer,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.01,
    num_workers: int | None = None,
    shard_tokens: int = 1 << 27,
    docs_per_chunk: int = 16,
    **source_kwargs,
) -> dict:
    """Tokenise ``source`` into shards under ``out_dir``; returns the manifest. Resumes an unfinished run."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    texts = open_source(source, **source_kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = len(tok)
    dtype = np.uint16 if vocab <= 65535 else np.uint32
    settings = {
        "format_version": FORMAT_VERSION,
        "tokenizer_hash": tokenizer_hash(tok),
        "vocab_size": vocab,
        "dtype": np.dtype(dtype).name,
        "source": str(getattr(texts, "source", "<iterable>")),
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
    }
    man_path = out / MANIFEST
    manifest = {**settings, "complete": False, "shards": [], "stats": {}}
    if man_path.exists():
        old = json.loads(man_path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise ValueError(
                f"{out} already holds shards prepared with different settings {diff}: use a new --out folder"
            )
        if old.get("complete"):
            return old
        manifest = old
    skip = manifest["shards"][-1]["doc_end"] if manifest["shards"] else 0
    threshold = int(val_fraction * 2**64)

    def _texts():
        for i, t in enumerate(texts):
            if i >= skip:
                yield t

    workers = max(1, num_workers or os.cpu_count() or 1)
    backend = getattr(tok, "backend_tokenizer", None)
    backend = Tokenizer.from_str(backend.to_str()) if backend is not None else tok  # a copy we may modify
    # fork shares the tokenizer without pickling and skips re-importing transformers in every worker.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers, _init_worker, (backend,)) if workers > 1 else None
    if pool is None:
        _init_worker(backend)
    mapper = pool.imap if pool is not None else map
    try:
        doc = skip
        writer, start = _ShardWriter(out, len(manifest["shards"]), dtype), doc
        bar = tqdm(desc=f"tokenizing {settings['source']}", unit="doc", initial=skip, disable=None)
        jobs = ((c, threshold, dtype) for c in _chunks(_texts(), docs_per_chunk))
        for ids, lengths, is_val, nbytes, max_id in mapper(_encode_chunk, jobs):
            nonempty = lengths > 0
            writer.empty_docs += int((~nonempty).sum())
            writer.add(ids, lengths[nonempty], is_val[nonempty])
            doc += len(lengths)
            writer.text_bytes += nbytes
            writer.max_token_id = max(writer.max_token_id, max_id)
            bar.update(len(lengths))
            if writer.tokens >= shard_tokens:
                manifest["shards"].append({**writer.close(), "doc_start": start, "doc_end": doc})
                _write_json_atomic(man_path, manifest)
                writer, start = _ShardWriter(out, len(manifest["shards"]), dtype), doc
        bar.close()
        rec = writer.close()
        if rec["train"]["docs"] + rec["val"]["docs"] or not manifest["shards"]:
            manifest["shards"].append({**rec, "doc_start": start, "doc_end": doc})
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    shards = manifest["shards"]
    stats = {
        "docs": doc,
        "empty_docs": sum(s["empty_docs"] for s in shards),
        "text_bytes": sum(s["text_bytes"] for s in shards),
        "max_token_id": max(s["max_token_id"] for s in shards),
        "replaced_bytes": getattr(texts, "replaced", 0),  # the whole source: it is re-read on resume
    }
    for split in ("train", "val"):
        stats[f"{split}_docs"] = sum(s[split]["docs"] for s in manifest["shards"])
        stats[f"{split}_tokens"] = sum(s[split]["tokens"] for s in manifest["shards"])
    if stats["train_docs"] + stats["val_docs"] == 0:
        raise ValueError(f"corpus {settings['source']} yielded no non-empty document: nothing to prepare")
    if val_fraction > 0 and stats["val_docs"] == 0:
        warnings.warn(
            f"val_fraction={val_fraction} selected no document: the corpus is too small", stacklevel=2
        )
    manifest.update(stats=stats, complete=True)
    _write_json_atomic(man_path, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------- reading
class TokenDataset:
    """One split of a prepared folder: ``ds[i]`` is document ``i``'s token ids, a read-only numpy view."""

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        self.path = Path(path)
        man = self.path / MANIFEST
        if not man.exists():
            raise FileNotFoundError(
                f"no {MANIFEST} in {self.path}: run `fat5 data prepare --out {self.path}`"
            )
        self.manifest = json.loads(man.read_text())
        if not self.manifest.get("complete"):
            raise ValueError(f"{self.path} is only partly prepared: rerun `fat5 data prepare` to finish it")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.split = split
        self.dtype = np.dtype(self.manifest["dtype"])
        self._tokens, self._offsets = [], []
        for s in self.manifest["shards"]:
            if s[split]["docs"] == 0:
                continue
            stem = self.path / f"{split}-{s['index']:05d}"
            self._tokens.append(np.memmap(f"{stem}.bin", dtype=self.dtype, mode="r"))
            self._offsets.append(np.load(f"{stem}.idx.npy"))
        self._starts = np.cumsum([0] + [len(o) - 1 for o in self._offsets])
        if len(self) == 0:
            raise ValueError(f"split {split!r} of {self.path} has no documents (val_fraction too small?)")

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_tokens(self) -> int:
        return int(sum(o[-1] for o in self._offsets))

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents")
        i %= len(self)
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        j = i - self._starts[s]
        off = self._offsets[s]
        return self._tokens[s][off[j] : off[j + 1]]

    def lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(o) for o in self._offsets])

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raise if a token id (data, or any id the tokenizer can emit) would index past the embedding."""
        max_id = self.manifest["stats"]["max_token_id"]
        if max_id >= model_vocab_size:
            raise ValueError(
                f"the data in {self.path} holds token id {max_id} but the model's vocabulary has only "
                f"{model_vocab_size} entries: use the tokenizer the model was made for, or a larger vocab_size"
            )
        if self.vocab_size > model_vocab_size:
            raise ValueError(
                f"the tokenizer of {self.path} has {self.vocab_size} tokens (sentinels and mode tokens "
                f"included) but the model's vocabulary has {model_vocab_size}: set the model's vocab_size "
                f">= {self.vocab_size}"
            )
