"""Token corpus shards on disk (docs/design.md#stage-1-lda).

A shard is a folder::

    tokens.u32    token ids, uint32 little-endian, all documents concatenated   [N]
    offsets.i64   CSR document offsets, int64, offsets[0] = 0, offsets[D] = N   [D + 1]
    meta.json     {"format", "version", "vocab_size", "num_docs", "num_tokens", "tokenizer", ...}

and, once labelled (:meth:`doe_ext.lda.LDA.label_to`), beside them::

    topic_ids.i16 per-token topic ids, int16, aligned with tokens.u32            [N]
    theta.f16     per-document topic mixtures, float16                          [D, K]
    labels.json   what produced them (model fingerprint, K, unlabeled policy)

Arrays are memory-mapped, so nothing requires the corpus to fit in RAM. ``meta.json`` (and
``labels.json``) are written last and atomically: a folder without them is an unfinished write and
is refused by :meth:`TokenCorpus.open`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

FORMAT = "doe_ext.token_corpus"
VERSION = 1
TOKENS_FILE = "tokens.u32"
OFFSETS_FILE = "offsets.i64"
META_FILE = "meta.json"
TOPICS_FILE = "topic_ids.i16"
THETA_FILE = "theta.f16"
LABELS_META_FILE = "labels.json"


class CorpusError(ValueError):
    """A corpus shard is missing, corrupt or inconsistent; the message names the file."""


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON so a reader sees the old file or the whole new one, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CorpusError(f"{path}: missing ({what})")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CorpusError(f"{path}: corrupt {what}: {e}") from e
    if not isinstance(obj, dict):
        raise CorpusError(f"{path}: corrupt {what}: expected a JSON object")
    return obj


def _check_arrays(tokens: np.ndarray, offsets: np.ndarray, vocab_size: int, where: str) -> None:
    if vocab_size < 1:
        raise CorpusError(f"{where}: vocab_size must be >= 1, got {vocab_size}")
    if offsets.ndim != 1 or len(offsets) < 1:
        raise CorpusError(f"{where}: offsets must be 1-D with D + 1 >= 1 entries")
    if offsets[0] != 0 or offsets[-1] != len(tokens):
        raise CorpusError(
            f"{where}: offsets must run from 0 to the token count {len(tokens)}, "
            f"got {int(offsets[0])}..{int(offsets[-1])}")
    block = 1 << 20  # checked in blocks: a shard's offsets may be larger than we want resident
    for lo in range(0, len(offsets) - 1, block):
        step = np.diff(offsets[lo:lo + block + 1])
        if np.any(step < 0):
            raise CorpusError(f"{where}: offsets decrease at document {lo + int(np.argmax(step < 0))}")


class TokenCorpus:
    """Documents of token ids: ``tokens`` (uint32 [N]) split by ``offsets`` (int64 [D + 1]).

    Build one in memory with :meth:`from_arrays`, persist it with :meth:`write`, and open a shard
    folder (memory-mapped, read-only) with :meth:`open`. ``corpus[d]`` is document ``d``'s tokens.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, vocab_size: int,
                 meta: dict | None = None, path: Path | None = None):
        self.tokens = tokens
        self.offsets = offsets
        self.vocab_size = int(vocab_size)
        self.meta = dict(meta or {})
        self.path = path

    # construction ------------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, tokens: Sequence[int] | np.ndarray, offsets: Sequence[int] | np.ndarray,
                    vocab_size: int, tokenizer: str | None = None) -> "TokenCorpus":
        """A corpus from concatenated token ids and CSR offsets (``offsets[d]:offsets[d+1]`` is doc d).

        Raises :class:`CorpusError` for a token id >= ``vocab_size``, a negative id, or bad offsets.
        """
        tok = np.asarray(tokens)
        if tok.ndim != 1:
            raise CorpusError(f"tokens: expected a 1-D array, got shape {tok.shape}")
        if tok.size and tok.dtype.kind == "i" and int(tok.min()) < 0:
            raise CorpusError(f"tokens: negative token id {int(tok.min())}")
        if tok.dtype.kind not in "iu" and tok.size:
            raise CorpusError(f"tokens: expected integer token ids, got dtype {tok.dtype}")
        tok = np.ascontiguousarray(tok, dtype=np.uint32)
        off = np.ascontiguousarray(np.asarray(offsets), dtype=np.int64)
        _check_arrays(tok, off, vocab_size, "from_arrays")
        if tok.size and int(tok.max()) >= vocab_size:
            i = int(np.argmax(tok >= vocab_size))
            raise CorpusError(f"tokens: token id {int(tok[i])} >= vocab_size {vocab_size} at token {i}")
        return cls(tok, off, vocab_size, {"tokenizer": tokenizer})

    @classmethod
    def from_documents(cls, docs: Iterable[Sequence[int]], vocab_size: int,
                       tokenizer: str | None = None) -> "TokenCorpus":
        """A corpus from an iterable of token-id sequences (small corpora, tests)."""
        arrays = [np.asarray(d, dtype=np.int64) for d in docs]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        return cls.from_arrays(tokens, offsets, vocab_size, tokenizer)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TokenCorpus":
        """Memory-map the shard folder ``path`` (read-only). Checks the files' sizes and offsets;
        token ids are range-checked by every engine call, or all at once by :meth:`validate`."""
        path = Path(path)
        if not path.is_dir():
            raise CorpusError(f"{path}: no such corpus shard folder")
        meta = read_json(path / META_FILE,
                         "corpus meta; the shard is unfinished or not a doe_ext corpus")
        if meta.get("format") != FORMAT:
            raise CorpusError(f"{path / META_FILE}: not a doe_ext corpus (format {meta.get('format')!r})")
        try:
            vocab_size, num_docs, num_tokens = (int(meta[k]) for k in ("vocab_size", "num_docs", "num_tokens"))
        except (KeyError, TypeError, ValueError) as e:
            raise CorpusError(f"{path / META_FILE}: corrupt corpus meta ({e!r})") from e
        tokens = _map(path / TOKENS_FILE, np.uint32, num_tokens)
        offsets = _map(path / OFFSETS_FILE, np.int64, num_docs + 1)
        _check_arrays(tokens, offsets, vocab_size, str(path / OFFSETS_FILE))
        return cls(tokens, offsets, vocab_size, meta, path)

    def write(self, path: str | os.PathLike, overwrite: bool = False) -> "TokenCorpus":
        """Write this corpus as a shard folder and return it opened from there."""
        path = Path(path)
        with CorpusWriter(path, self.vocab_size, tokenizer=self.meta.get("tokenizer"),
                          overwrite=overwrite) as w:
            w.add_arrays(self.tokens, self.offsets)
        return TokenCorpus.open(path)

    # access ------------------------------------------------------------------------------------
    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.num_docs

    def __getitem__(self, d: int) -> np.ndarray:
        return self.tokens[self.offsets[d]:self.offsets[d + 1]]

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return (f"TokenCorpus(num_docs={self.num_docs}, num_tokens={self.num_tokens}, "
                f"vocab_size={self.vocab_size}{where})")

    @property
    def tokens_file(self) -> str:
        return str(self.path / TOKENS_FILE) if self.path else "tokens"

    def slice(self, doc_lo: int, doc_hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, offsets) views of documents [doc_lo, doc_hi); offsets keep absolute positions."""
        offsets = self.offsets[doc_lo:doc_hi + 1]
        return self.tokens[offsets[0]:offsets[-1]], np.ascontiguousarray(offsets)

    def read_chunk(self, doc_lo: int, doc_hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`slice`, but a shard on disk is read into fresh arrays (not mapped), so
        streaming over a large shard keeps only one chunk resident."""
        if self.path is None:
            return self.slice(doc_lo, doc_hi)
        offsets = np.fromfile(self.path / OFFSETS_FILE, dtype="<i8", count=doc_hi - doc_lo + 1,
                              offset=8 * doc_lo)
        n = int(offsets[-1] - offsets[0])
        tokens = np.fromfile(self.path / TOKENS_FILE, dtype="<u4", count=n, offset=4 * int(offsets[0]))
        if len(offsets) != doc_hi - doc_lo + 1 or len(tokens) != n:
            raise CorpusError(f"{self.path}: shard files shorter than meta.json says (truncated?)")
        return tokens, offsets

    def chunks(self, max_tokens: int, start_doc: int = 0) -> Iterator[tuple[int, int]]:
        """Document ranges [lo, hi) of at most ``max_tokens`` tokens each (at least one document)."""
        d = start_doc
        while d < self.num_docs:
            hi = int(np.searchsorted(self.offsets, self.offsets[d] + max_tokens, side="right")) - 1
            hi = min(max(hi, d + 1), self.num_docs)
            yield d, hi
            d = hi

    def validate(self, chunk_tokens: int = 1 << 26) -> None:
        """Range-check every token id (streaming); raises :class:`CorpusError` naming the file."""
        for lo in range(0, self.num_tokens, chunk_tokens):
            part = self.tokens[lo:lo + chunk_tokens]
            if part.size and int(part.max()) >= self.vocab_size:
                i = lo + int(np.argmax(part >= self.vocab_size))
                raise CorpusError(f"{self.tokens_file}: token id {int(self.tokens[i])} >= vocab size "
                                  f"{self.vocab_size} at token {i}")

    def labels(self, path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Memory-map the finished labels (topic_ids int16 [N], theta float16 [D, K]) written by
        :meth:`LDA.label_to` into ``path`` (default: this shard's folder)."""
        folder = Path(path) if path is not None else self.path
        if folder is None:
            raise CorpusError("labels: an in-memory corpus has no labels folder; pass path=")
        meta = read_json(folder / LABELS_META_FILE, "labels meta; labelling has not finished")
        k = int(meta["num_topics"])
        return (_map(folder / TOPICS_FILE, np.int16, self.num_tokens),
                _map(folder / THETA_FILE, np.float16, self.num_docs * k).reshape(self.num_docs, k))


def _map(path: Path, dtype, count: int) -> np.ndarray:
    if not path.is_file():
        raise CorpusError(f"{path}: missing")
    size = path.stat().st_size
    want = count * np.dtype(dtype).itemsize
    if size != want:
        raise CorpusError(f"{path}: corrupt or truncated: {size} bytes, expected {want} "
                          f"({count} x {np.dtype(dtype).name})")
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class CorpusWriter:
    """Streams documents into a shard folder with bounded memory (offsets are the only thing kept).

    Files are written under ``<path>.partial`` and renamed to ``path`` on :meth:`close`, with
    ``meta.json`` last, so an interrupted build never leaves a folder that looks complete.
    """

    def __init__(self, path: str | os.PathLike, vocab_size: int, tokenizer: str | None = None,
                 overwrite: bool = False, extra_meta: dict | None = None):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise CorpusError(f"{self.path}: already exists (pass overwrite=True / --overwrite)")
        self.vocab_size = int(vocab_size)
        self.tokenizer = tokenizer
        self.extra_meta = dict(extra_meta or {})
        self._tmp = self.path.with_name(self.path.name + ".partial")
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True)
        self._tokens = open(self._tmp / TOKENS_FILE, "wb")
        self._offsets = [0]
        self._closed = False

    @property
    def num_tokens(self) -> int:
        return self._offsets[-1]

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        a = np.asarray(ids)
        if a.size and (int(a.min()) < 0 or int(a.max()) >= self.vocab_size):
            bad = int(a.max()) if int(a.max()) >= self.vocab_size else int(a.min())
            raise CorpusError(f"{self.path}: token id {bad} outside [0, {self.vocab_size}) "
                              f"in document {len(self._offsets) - 1}")
        self._tokens.write(np.ascontiguousarray(a, dtype="<u4").tobytes())
        self._offsets.append(self._offsets[-1] + int(a.size))

    def add_arrays(self, tokens: np.ndarray, offsets: np.ndarray, chunk_docs: int = 1 << 16) -> None:
        for lo in range(0, len(offsets) - 1, chunk_docs):
            hi = min(lo + chunk_docs, len(offsets) - 1)
            self._tokens.write(np.ascontiguousarray(tokens[offsets[lo]:offsets[hi]], dtype="<u4").tobytes())
            base = self._offsets[-1] - int(offsets[lo])
            self._offsets.extend((np.asarray(offsets[lo + 1:hi + 1], dtype=np.int64) + base).tolist())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._tokens.flush()
        os.fsync(self._tokens.fileno())
        self._tokens.close()
        np.asarray(self._offsets, dtype="<i8").tofile(self._tmp / OFFSETS_FILE)
        meta = {"format": FORMAT, "version": VERSION, "vocab_size": self.vocab_size,
                "num_docs": len(self._offsets) - 1, "num_tokens": self._offsets[-1],
                "tokenizer": self.tokenizer, **self.extra_meta}
        write_json_atomic(self._tmp / META_FILE, meta)
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self._tokens.close()
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "CorpusWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
