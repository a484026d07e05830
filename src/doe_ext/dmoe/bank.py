"""The expert bank (DMoE §3.2, App. B): one SQLite database, one BM25 index, one safetensors file per expert.

Layout of a bank directory::

    bank.sqlite                  WAL mode; the source of truth. meta (format, base fingerprint and name,
                                 dtype, the recipe: doe_ext.dmoe.recipe.Recipe), experts (id, text,
                                 augmentation, surrogate, recipe, fingerprint, loss, sha256 of the weight file, file name,
                                 whether the index has it), augmentations (a cache by document hash, so an
                                 interrupted build does not ask the model again), removals (index
                                 deletions not yet committed).
    index/                       tantivy BM25 (k1 = 1.2, b = 0.75, Lucene's formula) over each expert's
                                 text surrogate. Chosen over SQLite FTS5 and bm25s by measurement
                                 (benchmarks/results/history.md): FTS5 scores every row matching any query term
                                 (~200 ms for a 128-token query over 27,613 experts), bm25s has no
                                 incremental add; tantivy answers in ~3 ms (block-max WAND) and adds
                                 one document without touching the others. Rebuildable from SQLite.
    experts/<h>-<c>.safetensors  h: sha256 of the id, c: sha256 of the file. Content-addressed, so
                                 replacing an expert never overwrites the file its committed row names.
    reader/<c>.safetensors       the bank's knowledge reader, if it has one (doe_ext.dmoe.reader): one LoRA
                                 shared by all experts, named with its checksum in meta ("reader").

Crash safety: weights go to a temporary file that is fsynced and renamed (and the directory fsynced)
before the row commits; the row commits before the index, marked not yet indexed, and is marked
indexed after the index commits. Opening a bank finishes what a crash interrupted (rows not indexed
are indexed, pending deletions applied), so a crash leaves the bank as before or after the write,
plus at worst an unreferenced file that :meth:`ExpertBank.collect_garbage` removes. Routing only
returns ids that have a row. Loading checks the row's fingerprint, the file name's shape (no path can
escape the directory) and the file's checksum, and reads safetensors only (never pickle).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import json
import os
import re
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from doe_ext.dmoe.experts import ExpertSet, LoRAConfig
from doe_ext.dmoe.files import canonical_safetensors, write_durably
from doe_ext.dmoe.recipe import Recipe

if TYPE_CHECKING:
    from doe_ext.dmoe.reader import Reader

FORMAT = "doe_ext.dmoe.bank/2"  # /2: one Recipe in meta (was: "lora" and "train")
DB = "bank.sqlite"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_FILE_RE = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{16}\.safetensors$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS experts (
    rowid INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, text TEXT NOT NULL, augmentation TEXT NOT NULL,
    surrogate TEXT NOT NULL, config TEXT NOT NULL, fingerprint TEXT NOT NULL, loss REAL,
    checksum TEXT NOT NULL, file TEXT NOT NULL, created REAL NOT NULL, indexed INTEGER NOT NULL DEFAULT 0,
    title TEXT);
CREATE TABLE IF NOT EXISTS augmentations (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS removals (id TEXT PRIMARY KEY);
"""


_ROW = "id, text, surrogate, loss, checksum, file, created, augmentation, config, title"


class BankError(ValueError):
    """A bank that cannot be used as asked (wrong base model, corrupt file, bad id)."""


def check_id(expert_id: str) -> str:
    """Expert ids are any non-empty text without path separators, NUL or control characters, and not
    ``.`` / ``..`` (file names never come from ids, but an id that looks like a path is refused)."""
    if not isinstance(expert_id, str) or not expert_id or expert_id in (".", "..") or any(
            c in expert_id for c in "/\\") or any(ord(c) < 32 for c in expert_id):
        raise BankError(f"ExpertBank: invalid expert id {expert_id!r} (no '/', '\\\\', control characters, '.' or '..')")
    return expert_id


@functools.lru_cache(maxsize=1)
def _analyzer():
    import tantivy

    # tantivy's "default" tokenizer, so that query terms are the index's terms.
    return (tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple()).filter(tantivy.Filter.remove_long(40))
            .filter(tantivy.Filter.lowercase()).build())


def query_terms(text: str) -> list[str]:
    """The distinct index terms of free text (lowercased alphanumeric runs), in order of first use."""
    return list(dict.fromkeys(_analyzer().analyze(text)))


@dataclass
class ExpertRow:
    id: str
    text: str
    surrogate: str
    loss: float | None
    checksum: str
    file: str
    created: float
    augmentation: str = "{}"
    config: str = "{}"
    title: str | None = None


def _read_checked(path: Path, checksum: str, what: str) -> bytes:
    """The bytes of a weight file whose sha256 its row (or the bank's meta) gives; ``what`` names it in errors."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BankError(f"ExpertBank: {what}: weight file {path} is missing") from None
    got = hashlib.sha256(data).hexdigest()
    if got != checksum:
        raise BankError(f"ExpertBank: {what}: {path} has sha256 {got}, its row says {checksum}")
    return data


class ExpertBank:
    """A directory of LoRA experts for one base model, with BM25 routing over their text surrogates.

    Args:
        path: the bank directory (created with ``create=True``).
        create: make a new bank (or open the bank there, if it was made with the same fingerprint,
            recipe and dtype); needs ``fingerprint`` and ``recipe``.
        fingerprint: the base model's (:func:`doe_ext.dmoe.base.fingerprint`).
        base_name: what ``load_base`` was given, so ``ask`` can load the same base.
        recipe: how every expert of the bank is made (one per bank; :meth:`check_recipe`).
        dtype: weights on disk, ``"float32"`` or ``"bfloat16"``.
        cache_size: experts kept in memory after loading.
    """

    def __init__(self, path: str | os.PathLike, create: bool = False, fingerprint: str | None = None,
                 base_name: str | None = None, recipe: Recipe | None = None, dtype: str = "float32",
                 cache_size: int = 256):
        self.path = Path(path)
        db = self.path / DB
        if create:
            if dtype not in DTYPES:
                raise BankError(f"ExpertBank: `dtype` must be one of {sorted(DTYPES)}, got {dtype!r}")
            if fingerprint is None or recipe is None:
                raise BankError("ExpertBank: a new bank needs the base model's `fingerprint` and a `recipe`")
            (self.path / "experts").mkdir(parents=True, exist_ok=True)
        elif not db.is_file():
            raise FileNotFoundError(f"ExpertBank: {self.path}: no bank here ({DB} missing)")
        self._db = sqlite3.connect(db, timeout=60, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        if create:
            self._db.executescript(_SCHEMA)
            meta = {"format": FORMAT, "fingerprint": fingerprint, "base": base_name or "",
                    "recipe": recipe.to_json(), "dtype": dtype}
            old = self.meta()
            if old.get("format") == FORMAT:
                if (old["fingerprint"], old["dtype"]) != (fingerprint, dtype):
                    raise BankError(f"ExpertBank: {self.path} already holds a bank for fingerprint "
                                    f"{old['fingerprint']} and dtype {old['dtype']}; asked for {fingerprint} and {dtype}")
                self._check_recipe(Recipe.from_json(old["recipe"]), recipe)
            with self._tx():
                self._db.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", meta.items())
        m = self.meta()
        if m.get("format") != FORMAT:
            raise BankError(f"ExpertBank: {db} has format {m.get('format')!r}, expected {FORMAT!r}")
        self.fingerprint, self.base_name, self.dtype = m["fingerprint"], m["base"], m["dtype"]
        self.recipe = Recipe.from_json(m["recipe"])
        self._cache: OrderedDict[str, tuple[str, dict[str, Tensor]]] = OrderedDict()
        self._cache_size = cache_size
        self._open_index()
        self.reconcile()

    # -- the BM25 index ----------------------------------------------------------------------
    def _open_index(self) -> None:
        import tantivy

        sb = tantivy.SchemaBuilder()
        sb.add_text_field("id", stored=True, tokenizer_name="raw")
        sb.add_text_field("body", index_option="freq")  # BM25 needs term frequencies, not positions
        self._schema = sb.build()
        folder = self.path / "index"
        folder.mkdir(exist_ok=True)
        self._index = tantivy.Index(self._schema, path=str(folder))

    def _index_update(self, remove: list[str] = (), add: list[tuple[str, str]] = (), clear: bool = False) -> None:
        """Delete ``remove`` ids (or everything, ``clear``), (re)index ``add`` (id, surrogate) pairs, and
        commit once. The writer (tantivy's lock on the index) is held only for this call."""
        import tantivy

        try:
            writer = self._index.writer(15_000_000, 1)
        except ValueError as e:
            raise BankError(f"ExpertBank: {self.path} is being written by another process ({e})") from None
        try:
            if clear:
                writer.delete_all_documents()
            for eid in [*remove, *(a for a, _ in add)]:
                writer.delete_documents_by_term("id", eid)
            for eid, surrogate in add:
                writer.add_document(tantivy.Document(id=eid, body=surrogate))
            writer.commit()
        finally:
            writer.wait_merging_threads()  # consumes the writer: releases the lock
        self._index.reload()

    def reconcile(self) -> None:
        """Bring the index in line with the rows: apply pending deletions, index rows not yet indexed
        (what a crash between the row's commit and the index's left undone)."""
        removals = [r[0] for r in self._db.execute("SELECT id FROM removals")]
        adds = list(self._db.execute("SELECT id, surrogate, checksum FROM experts WHERE indexed = 0"))
        if not removals and not adds:
            return
        self._index_update(removals, [(i, s) for i, s, _ in adds])
        with self._tx():
            self._db.executemany("DELETE FROM removals WHERE id = ?", [(i,) for i in removals])
            self._db.executemany("UPDATE experts SET indexed = 1 WHERE id = ? AND checksum = ?",
                                 [(i, c) for i, _, c in adds])

    def reindex(self) -> None:
        """Rebuild the index from the rows (after the index folder was lost or damaged)."""
        self._index_update(clear=True)
        with self._tx():
            self._db.execute("UPDATE experts SET indexed = 0")
        self.reconcile()

    # -- bookkeeping -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _tx(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def meta(self) -> dict[str, str]:
        try:
            return dict(self._db.execute("SELECT key, value FROM meta"))
        except sqlite3.OperationalError:
            return {}

    def set_meta(self, key: str, value: str) -> None:
        with self._tx():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM experts").fetchone()[0]

    def __contains__(self, expert_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM experts WHERE id = ?", (expert_id,)).fetchone() is not None

    def ids(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT id FROM experts ORDER BY rowid")]

    def rows(self) -> list[ExpertRow]:
        cur = self._db.execute(f"SELECT {_ROW} FROM experts ORDER BY rowid")
        return [ExpertRow(*r) for r in cur]

    def row(self, expert_id: str) -> ExpertRow:
        r = self._db.execute(f"SELECT {_ROW} FROM experts WHERE id = ?", (expert_id,)).fetchone()
        if r is None:
            raise KeyError(f"ExpertBank: no expert with id {expert_id!r} in {self.path}")
        return ExpertRow(*r)

    @property
    def lora(self) -> LoRAConfig:
        return self.recipe.lora

    def _check_recipe(self, mine: Recipe, asked: Recipe) -> None:
        diff = mine.differences(asked)
        if diff:
            raise BankError(f"ExpertBank: {self.path} was built with another recipe: " + ", ".join(diff)
                            + "; a bank holds experts of one recipe (build a new bank for this one)")

    def check_recipe(self, recipe: Recipe) -> None:
        """Refuse to add experts made with another recipe, naming every field that differs."""
        self._check_recipe(self.recipe, recipe)

    def check_base(self, fingerprint: str) -> None:
        """Refuse a base model the experts were not trained for."""
        if fingerprint != self.fingerprint:
            raise BankError(f"ExpertBank: {self.path} holds experts for base fingerprint {self.fingerprint} "
                            f"({self.base_name or 'unnamed'}), but the model given has fingerprint {fingerprint}")

    # -- the cache of what the base model wrote (augmentations, distillation instances) -------------
    def cached(self, key: str) -> str | None:
        r = self._db.execute("SELECT value FROM augmentations WHERE key = ?", (key,)).fetchone()
        return None if r is None else r[0]

    def cache(self, items: dict[str, str]) -> None:
        with self._tx():
            self._db.executemany("INSERT OR REPLACE INTO augmentations VALUES (?, ?)", items.items())

    # -- writes ------------------------------------------------------------------------------
    def add(self, expert_id: str, tensors: dict[str, Tensor], text: str, surrogate: str, augmentation: str = "{}",
            loss: float | None = None, title: str | None = None) -> None:
        """Add (or replace) one expert: weights durably on disk first, then its row and index entry in one
        transaction. Other experts and the rest of the index are not touched."""
        check_id(expert_id)
        dt = DTYPES[self.dtype]
        weights = {k: v.detach().to(dt).contiguous().cpu() for k, v in sorted(tensors.items())}
        data = canonical_safetensors(st_save(weights, metadata={"id": expert_id, "fingerprint": self.fingerprint}))
        checksum = hashlib.sha256(data).hexdigest()
        name = f"{hashlib.sha256(expert_id.encode()).hexdigest()[:16]}-{checksum[:16]}.safetensors"
        folder = self.path / "experts"
        write_durably(folder, name, data)
        with self._tx():
            old = self._db.execute("SELECT file FROM experts WHERE id = ?", (expert_id,)).fetchone()
            self._db.execute("DELETE FROM experts WHERE id = ?", (expert_id,))
            self._db.execute(
                "INSERT INTO experts (id, text, augmentation, surrogate, config, fingerprint, loss, checksum, file, "
                "created, title) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (expert_id, text, augmentation, surrogate, self.recipe.to_json(),
                 self.fingerprint, loss, checksum, name, time.time(), title))
        self._cache.pop(expert_id, None)
        if old is not None and old[0] != name:
            (folder / old[0]).unlink(missing_ok=True)
        self.reconcile()  # indexes this row (and anything an earlier crash left unindexed)

    def remove(self, expert_ids: list[str]) -> None:
        """Delete experts (their rows, index entries and files); an unknown id raises ``KeyError``."""
        files = []
        with self._tx():
            for eid in expert_ids:
                old = self._db.execute("SELECT file FROM experts WHERE id = ?", (eid,)).fetchone()
                if old is None:
                    raise KeyError(f"ExpertBank: no expert with id {eid!r} in {self.path}")
                self._db.execute("INSERT OR IGNORE INTO removals VALUES (?)", (eid,))
                self._db.execute("DELETE FROM experts WHERE id = ?", (eid,))
                files.append(old[0])
        self.reconcile()
        for eid, f in zip(expert_ids, files):
            self._cache.pop(eid, None)
            (self.path / "experts" / f).unlink(missing_ok=True)

    def collect_garbage(self) -> int:
        """Remove weight files no row names (left by a crash between rename and commit). Returns how many."""
        keep = {r[0] for r in self._db.execute("SELECT file FROM experts")}
        n = 0
        for f in (self.path / "experts").iterdir():
            if f.name not in keep and (f.name.startswith(".tmp-") or _FILE_RE.match(f.name)):
                f.unlink(missing_ok=True)
                n += 1
        return n

    # -- the knowledge reader (doe_ext.dmoe.reader) ------------------------------------------------
    def set_reader(self, reader: "Reader") -> None:
        """Store ``reader`` as the bank's (replacing any), after checking that it was trained for this
        bank's base and recipe: ``reader/<sha256>.safetensors``, named in the bank's meta once the file is
        durably on disk."""
        reader.check(self.fingerprint, self.recipe, where=f"bank {self.path}")
        data = reader.to_bytes()
        checksum = hashlib.sha256(data).hexdigest()
        name = f"{checksum[:32]}.safetensors"
        folder = self.path / "reader"
        folder.mkdir(exist_ok=True)
        write_durably(folder, name, data)
        old = self.meta().get("reader")
        self.set_meta("reader", json.dumps({"file": name, "checksum": checksum, "name": reader.name}))
        if old and json.loads(old)["file"] != name:
            (folder / json.loads(old)["file"]).unlink(missing_ok=True)

    def remove_reader(self) -> bool:
        """Drop the bank's reader (its row first, then its file). Returns whether there was one."""
        old = self.meta().get("reader")
        if old is None:
            return False
        with self._tx():
            self._db.execute("DELETE FROM meta WHERE key = 'reader'")
        (self.path / "reader" / json.loads(old)["file"]).unlink(missing_ok=True)
        return True

    def reader(self) -> "Reader | None":
        """The bank's reader, verified (file name, checksum, base and recipe), or None."""
        from doe_ext.dmoe.reader import Reader

        entry = self.meta().get("reader")
        if entry is None:
            return None
        entry = json.loads(entry)
        if not re.fullmatch(r"[0-9a-f]{32}\.safetensors", entry["file"]):
            raise BankError(f"ExpertBank: {self.path}: the reader names the file {entry['file']!r}, "
                            "which is not a bank file name")
        path = self.path / "reader" / entry["file"]
        reader = Reader.from_bytes(_read_checked(path, entry["checksum"], f"{self.path}: the reader"), str(path))
        reader.check(self.fingerprint, self.recipe, where=f"bank {self.path}")
        return reader

    # -- reads -------------------------------------------------------------------------------
    def route(self, query: str, k: int = 3) -> list[str]:
        """The ids of :meth:`search`."""
        if k < 1:
            raise ValueError(f"ExpertBank.route: `k` must be >= 1, got {k}")
        return [h for h, _ in self.search(query, k)]

    def search(self, query: str, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` experts whose surrogates best match ``query`` under BM25, best first (equal scores:
        the older expert first), with their scores. Each distinct query term counts once. A query
        sharing no term with any surrogate gives ``[]``."""
        import tantivy

        if k < 1:
            raise ValueError(f"ExpertBank.search: `k` must be >= 1, got {k}")
        terms = query_terms(query)
        if not terms:
            return []
        q = tantivy.Query.boolean_query([(tantivy.Occur.Should, tantivy.Query.term_query(self._schema, "body", t))
                                         for t in terms])
        searcher = self._index.searcher()
        hits = [(score, searcher.doc(addr)["id"][0]) for score, addr in searcher.search(q, k + 8).hits]
        if not hits:
            return []
        marks = ",".join("?" * len(hits))
        rowid = dict(self._db.execute(f"SELECT id, rowid FROM experts WHERE indexed = 1 AND id IN ({marks})",
                                      [h for _, h in hits]))
        ranked = sorted((-score, rowid[h], h) for score, h in hits if h in rowid)
        return [(h, -s) for s, _, h in ranked[:k]]

    def get(self, expert_id: str) -> dict[str, Tensor]:
        """One expert's tensors (float32), verified: fingerprint, file name and checksum."""
        row = self._db.execute("SELECT fingerprint, checksum, file FROM experts WHERE id = ?", (expert_id,)).fetchone()
        if row is None:
            raise KeyError(f"ExpertBank: no expert with id {expert_id!r} in {self.path}")
        fp, checksum, name = row
        hit = self._cache.get(expert_id)
        if hit is not None and hit[0] == checksum:
            self._cache.move_to_end(expert_id)
            return hit[1]
        if fp != self.fingerprint:
            raise BankError(f"ExpertBank: expert {expert_id!r} was trained for base fingerprint {fp}, "
                            f"the bank's is {self.fingerprint}")
        if not _FILE_RE.match(name):
            raise BankError(f"ExpertBank: expert {expert_id!r} names the file {name!r}, which is not a bank file name")
        path = self.path / "experts" / name
        data = _read_checked(path, checksum, f"expert {expert_id!r}")
        try:
            tensors = {k: v.float() for k, v in st_load(data).items()}
        except Exception as e:  # safetensors only: anything else (a pickle, say) is refused, never run
            raise BankError(f"ExpertBank: expert {expert_id!r}: {path} is not a safetensors file ({e})") from None
        self._cache[expert_id] = (checksum, tensors)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return tensors

    def load(self, expert_ids: list[str], names: tuple[str, ...]) -> ExpertSet:
        """Stack experts into an :class:`ExpertSet` over the projections ``names``, in the order given."""
        return ExpertSet.stack([self.get(e) for e in expert_ids], names)

    def _repr_html_(self, rows: int = 10) -> str:
        body = "".join(f"<tr><td>{html.escape(r.id)}</td><td>{'' if r.loss is None else f'{r.loss:.4f}'}</td>"
                       f"<td>{html.escape(r.text[:120])}</td></tr>" for r in self.rows()[:rows])
        more = f"<p>... {len(self) - rows} more</p>" if len(self) > rows else ""
        return (f"<p><b>ExpertBank</b> {html.escape(str(self.path))}: {len(self)} experts, base "
                f"{html.escape(self.base_name or self.fingerprint)}, {self.recipe.objective}, rank {self.lora.rank}, "
                f"alpha {self.lora.alpha}, "
                f"{self.dtype}{self._reader_note()}</p><table><tr><th>id</th><th>loss</th><th>text</th></tr>{body}</table>{more}")

    def __repr__(self) -> str:
        return (f"ExpertBank({str(self.path)!r}, experts={len(self)}, base={self.base_name or self.fingerprint!r}, "
                f"objective={self.recipe.objective!r}, rank={self.lora.rank}, alpha={self.lora.alpha}, dtype={self.dtype}"
                f"{self._reader_note('=')})")

    def _reader_note(self, sep: str = " ") -> str:
        entry = self.meta().get("reader")
        return "" if entry is None else f", reader{sep}{json.loads(entry)['name']!r}"
