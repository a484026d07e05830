"""Augmentation: the App. C prompts, the JSON parser, bounded retries."""
import pytest

from doe_ext.dmoe import Augmentation, augment_documents, parse_qa, qa_prompt
from doe_ext.dmoe.augment import QA_PROMPT, REWRITE_PROMPT


def test_parse_qa_list():
    text = 'Sure! [{"question": "Q1?", "answer": "A1", "full_answer": "F1."}, {"question": "Q2?", "answer": "A2"}] done'
    assert parse_qa(text) == [{"question": "Q1?", "answer": "A1", "full_answer": "F1."},
                              {"question": "Q2?", "answer": "A2", "full_answer": "A2"}]


def test_parse_qa_broken_list_falls_back_to_objects():
    text = '[{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": ' \
           '"A2"}, {"question": "unterminated'
    assert [q["question"] for q in parse_qa(text)] == ["Q1?", "Q2?"]


@pytest.mark.parametrize("text", ["", "no json here", "[1, 2, 3]", '[{"question": "", "answer": "x"}]',
                                  '[{"question": "q", "answer": 3}]', '{"q": "x"}'])
def test_parse_qa_rejects(text):
    assert parse_qa(text) == []


def test_parse_qa_keeps_three():
    text = "[" + ",".join(f'{{"question": "q{i}", "answer": "a{i}"}}' for i in range(5)) + "]"
    assert [q["answer"] for q in parse_qa(text)] == ["a0", "a1", "a2"]


def test_prompts_are_the_papers():
    assert REWRITE_PROMPT.startswith("Rewrite the following passage.") and REWRITE_PROMPT.endswith("Passage: {passage}")
    assert "three different questions" in QA_PROMPT and '"full_answer"' in QA_PROMPT.format(passage="p")


def test_qa_prompt_puts_passages_first(base):
    p = qa_prompt(base.tokenizer, "Why?", ["one", "two"])
    assert p.index("Passage 1: one") < p.index("Passage 2: two") < p.index("Question: Why?")
    assert qa_prompt(base.tokenizer, "Why?").endswith("Question: Why?\nAnswer:\n")  # no chat template here


def test_random_model_exhausts_its_retries(base):
    """A random model never writes JSON: every try is used, and the document keeps its rewrite, no QA."""
    augs = augment_documents(base, ["The sea otter floats.", "Basalt is dark."], retries=2, max_new_tokens=8)
    for a in augs:
        assert a.kind == "model" and a.attempts == 2 and a.qa == [] and isinstance(a.rewrite, str)
    again = augment_documents(base, ["The sea otter floats.", "Basalt is dark."], retries=2, max_new_tokens=8)
    assert [a.rewrite for a in again] == [a.rewrite for a in augs]  # greedy, so cached runs agree


def test_none_and_bad_arguments(base):
    assert augment_documents(base, ["x"], kind="none") == [Augmentation()]
    with pytest.raises(ValueError, match="`kind` must be one of"):
        augment_documents(base, ["x"], kind="gpt")
    with pytest.raises(ValueError, match="`retries` must be >= 1"):
        augment_documents(base, ["x"], retries=0)


def test_surrogate_and_json_round_trip():
    a = Augmentation("model", "re", [{"question": "q", "answer": "a", "full_answer": "a"}], 1)
    assert a.surrogate("doc") == "doc\nre\nq a"
    assert Augmentation.from_json(a.to_json()) == a
