"""The fictional knowledge set: deterministic, frozen as generated, answerable from its documents,
and asked in wordings apart from the prose and from the train split's."""
import json
import re

import pytest

from doe_ext.dmoe import fiction
from doe_ext.dmoe.data import DATA, load


def test_the_frozen_files_are_the_generator_s_output():
    docs, qs = fiction.generate(0)
    frozen_docs, frozen_qs = load(fiction.NAME)
    assert frozen_docs == docs and frozen_qs == qs
    assert fiction.generate(0) == (docs, qs) and fiction.generate(1) != (docs, qs)


def test_shape_and_splits():
    docs, qs = load(fiction.NAME)
    by_id = {d["id"]: d for d in docs}
    assert len(by_id) == len(docs) == 200
    assert sum(d["split"] == "dev" for d in docs) == 40
    assert {q["split"] for q in qs} == {"train", "dev"}
    for q in qs:
        assert by_id[q["doc_id"]]["split"] == q["split"]  # a question is about a document of its own split
    dev_q = [q for q in qs if q["split"] == "dev"]
    assert len(dev_q) == 80 and len({q["doc_id"] for q in dev_q}) == 40
    assert len([q for q in qs if q["split"] == "train"]) == 5 * 160  # every fact of a train document


def test_every_answer_is_in_its_document_and_no_question_copies_a_sentence():
    docs, qs = load(fiction.NAME)
    text = {d["id"]: d["text"] for d in docs}
    for q in qs:
        assert q["answers"][0] in text[q["doc_id"]], q
        sentences = re.split(r"(?<=\.) ", text[q["doc_id"]])
        assert q["question"].rstrip("?") not in text[q["doc_id"]] and q["question"] not in sentences


def test_every_sentence_names_its_subject_and_names_are_unique():
    docs, _ = load(fiction.NAME)
    for d in docs:
        assert all(d["title"] in s for s in re.split(r"(?<=\.) ", d["text"])), d
    titles = [d["title"] for d in docs]
    assert len(set(titles)) == len(titles)


def test_dev_wordings_are_not_train_wordings():
    """Questions with their subject blanked out: no dev wording is a train wording."""
    docs, qs = load(fiction.NAME)
    title = {d["id"]: d["title"] for d in docs}
    wording = {s: {q["question"].replace(title[q["doc_id"]], "{s}") for q in qs if q["split"] == s}
               for s in ("train", "dev")}
    assert wording["dev"] and wording["train"] and not wording["dev"] & wording["train"]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="`dev_questions` in \\[1, 5\\], got train=1, dev=1, dev_questions=6"):
        fiction.generate(0, train=1, dev=1, dev_questions=6)


def test_freeze_writes_the_versioned_files(tmp_path):
    fiction.freeze(tmp_path)
    for suffix in ("docs", "qa"):
        assert (tmp_path / f"fiction-v1.{suffix}.jsonl").read_bytes() == (DATA / f"fiction-v1.{suffix}.jsonl").read_bytes()
    assert all(json.loads(line) for line in (tmp_path / "fiction-v1.qa.jsonl").read_text().splitlines())
