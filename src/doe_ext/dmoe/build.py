"""Building a bank from documents: read ``DOCS.jsonl``, augment and (for distillation) run the teacher
(both cached in the bank, so neither is asked again), train in groups with the bank's
:class:`~doe_ext.dmoe.recipe.Recipe`, commit each expert. Resumable: experts already in the bank are skipped, cached augmentations
are reused, and a build killed at any point and run again gives the bank an uninterrupted build gives."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from typing import Callable, Iterable

from tqdm.auto import tqdm

from doe_ext.dmoe.augment import QA_DEMONSTRATION, SENTENCE_QUESTIONS, Augmentation, Document, augment_documents
from doe_ext.dmoe.bank import ExpertBank, check_id
from doe_ext.dmoe.base import BaseLM
from doe_ext.dmoe.data import read_jsonl
from doe_ext.dmoe.distill import instances_for
from doe_ext.dmoe.instances import Instance
from doe_ext.dmoe.recipe import SFT_DOCS_PER_STEP
from doe_ext.dmoe.train import TrainedExpert, train_adapter, train_experts


def read_documents(path: str | os.PathLike) -> list[Document]:
    """``{"id": str, "text": str}`` per line, with an optional ``"title": str`` (the subject distillation
    asks about); errors name the file and line. Blank lines are skipped; an id given twice is an error."""
    docs, seen = [], {}
    for n, obj in read_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not isinstance(obj.get("text"), str):
            raise ValueError(f'{path}:{n}: expected {{"id": str, "text": str}}')
        try:
            check_id(obj["id"])
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        if not obj["text"].strip():
            raise ValueError(f"{path}:{n}: document {obj['id']!r} has empty text")
        if obj.get("title") is not None and not isinstance(obj["title"], str):
            raise ValueError(f"{path}:{n}: `title` must be a string")
        if obj["id"] in seen:
            raise ValueError(f"{path}:{n}: id {obj['id']!r} already given on line {seen[obj['id']]}")
        seen[obj["id"]] = n
        docs.append(Document(obj["id"], obj["text"], obj.get("title")))
    return docs


def augmentation_key(fingerprint: str, kind: str, text: str) -> str:
    what = kind
    if kind in ("qa", "sentences"):  # the worked example is part of what the model was asked
        what += hashlib.sha256(QA_DEMONSTRATION.read_bytes()).hexdigest()
    if kind == "sentences":  # and how many of the document's sentences
        what += str(SENTENCE_QUESTIONS)
    return hashlib.sha256(f"{fingerprint}\0{what}\0{text}".encode()).hexdigest()


_MADE: dict[str, str] = {}  # what this process made, for the next bank of the same base and documents


def forget_made() -> None:
    """Drop what this process made for earlier banks, so the next build makes its own (a benchmark
    timing whole builds one after another)."""
    _MADE.clear()


def _cached(bank: ExpertBank, keys: list[str], make: Callable[[list[int]], list[str]]) -> list[str]:
    """The bank's cached value of each key (or this process's, made for another bank: the keys name the
    base and everything the value depends on); the missing ones made (``make(indices)``) and cached."""
    stored = [bank.cached(k) for k in keys]
    got = [v or _MADE.get(k) for k, v in zip(keys, stored)]
    todo = [i for i, g in enumerate(got) if g is None]
    if todo:
        for i, v in zip(todo, make(todo)):
            got[i] = _MADE[keys[i]] = v
    bank.cache({k: v for k, v, old in zip(keys, got, stored) if old is None})
    return got


def augmentations(base: BaseLM, bank: ExpertBank, docs: list[Document]) -> list[Augmentation]:
    """Each document's augmentation (the bank's recipe's): from the bank's cache, or written by the
    base model and cached."""
    kind = bank.recipe.augment
    keys = [augmentation_key(bank.fingerprint, kind, d.text) for d in docs]
    got = _cached(bank, keys, lambda todo: [a.to_json() for a in
                                            augment_documents(base, [docs[i].text for i in todo], kind)])
    return [Augmentation.from_json(g) for g in got]


# Bumped when the making of instances changes (2: a long document's distillation instances are kept).
INSTANCES_VERSION = 2


def instances_key(bank: ExpertBank, doc: Document, aug: Augmentation) -> str:
    """What a document's instances depend on: the base, the recipe's instance fields, the document, its
    augmentation, and :data:`INSTANCES_VERSION`."""
    r = bank.recipe
    what = [bank.fingerprint, r.objective, list(r.instances), r.answer_tokens, r.max_length, doc.text, doc.title,
            aug.to_json(), INSTANCES_VERSION]
    return "instances:" + hashlib.sha256(json.dumps(what).encode()).hexdigest()


def instances(base: BaseLM, bank: ExpertBank, items: list[tuple[Document, Augmentation]]) -> list[list[Instance]]:
    """Each document's training instances under the bank's recipe: from the bank's cache, or made (the
    distillation teacher's answers generated) and cached."""
    keys = [instances_key(bank, d, a) for d, a in items]
    got = _cached(bank, keys, lambda todo: [json.dumps([asdict(i) for i in doc]) for doc in
                                            instances_for(base, [items[i] for i in todo], bank.recipe)])
    return [[Instance(**i) for i in json.loads(g)] for g in got]


def commit(bank: ExpertBank, doc: Document, aug: Augmentation, expert: TrainedExpert) -> None:
    """One trained expert into the bank, with its surrogate (document + augmentation)."""
    bank.add(doc.id, expert.tensors, doc.text, aug.surrogate(doc.text), aug.to_json(), expert.loss, doc.title)


def build_bank(base: BaseLM, docs: Iterable[Document], bank: ExpertBank, group_size: int = 32, replace: bool = False,
               progress: bool = True) -> list[str]:
    """Train (with the bank's recipe) and commit an expert for every document not yet in ``bank`` (all
    of them with ``replace=True``). ``group_size`` documents are augmented and trained together.
    Returns the ids trained now."""
    bank.check_base(base.fingerprint)
    if group_size < 1:
        raise ValueError(f"build: `group_size` must be >= 1, got {group_size}")
    bank.collect_garbage()
    docs = list(docs)
    todo = docs if replace else [d for d in docs if d.id not in bank]
    # The bar counts experts, a group's in fractions as its optimizer steps go (so it moves, and its
    # estimate of the time left holds, from the first group on); the phase is shown beside it.
    bar = tqdm(total=len(todo), desc="experts", unit="expert", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
    try:
        for s in range(0, len(todo), group_size):
            group = todo[s:s + group_size]
            bar.set_postfix_str("augmenting")
            items = list(zip(group, augmentations(base, bank, group)))
            bar.set_postfix_str("teacher answers" if bank.recipe.objective == "distill" else "instances")
            insts = instances(base, bank, items)
            bar.set_postfix_str("training")

            def step(done: int, total: int, start: int = s, n: int = len(group)) -> None:
                bar.update(start + n * done / total - bar.n)

            trained = train_experts(base, items, bank.recipe, instances=insts, on_step=step)
            for (d, a), e in zip(items, trained):
                commit(bank, d, a, e)
            bar.update(s + len(group) - bar.n)
    finally:
        bar.close()
    return [d.id for d in todo]


def sft_bank(base: BaseLM, bank: ExpertBank, docs_per_step: int = SFT_DOCS_PER_STEP,
             progress: bool = False) -> ExpertBank:
    """The SFT-LoRA adapter for ``bank``'s documents (with their cached augmentations and instances and
    the bank's recipe, ``docs_per_step`` documents' instances per optimizer step), in a bank of one at
    ``BANK/sft``; trained again only when the documents, the recipe or ``docs_per_step`` change. Hand it
    to the evaluation harness (``Harness(base, bank, sft=sft_bank(base, bank))``) for the ``sft`` method."""
    rows = bank.rows()
    corpus = hashlib.sha256(json.dumps([[r.id, r.text, r.augmentation] for r in rows]
                                       + [bank.recipe.to_dict(), docs_per_step], sort_keys=True).encode()).hexdigest()
    sft = ExpertBank(bank.path / "sft", create=True, fingerprint=bank.fingerprint, base_name=bank.base_name,
                     recipe=bank.recipe, dtype=bank.dtype)
    if sft.meta().get("corpus") != corpus or "sft" not in sft:
        items = [(Document(r.id, r.text, r.title), Augmentation.from_json(r.augmentation)) for r in rows]
        e = train_adapter(base, items, bank.recipe, docs_per_step=docs_per_step, instances=instances(base, bank, items),
                          progress=progress)
        sft.add("sft", e.tensors, f"SFT-LoRA over {len(rows)} documents", "", loss=e.loss)
        sft.set_meta("corpus", corpus)
    return sft
