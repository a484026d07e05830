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


def test_qa_lines_parse_dedupe_and_stop_at_a_blank_line():
    from doe_ext.dmoe.augment import parse_qa_lines

    text = (" Who keeps it?\nA: the team\nQ: who keeps it?\nA: again\nQ: Where?\nA: \nQ: What is it?\nA: a tool\n"
            "\nPassage: next\nQ: Late?\nA: no")
    assert parse_qa_lines(text) == [{"question": "Who keeps it?", "answer": "the team", "full_answer": "the team"},
                                    {"question": "What is it?", "answer": "a tool", "full_answer": "a tool"}]
    many = "".join(f" q{i}?\nA: a{i}\nQ:" for i in range(6))
    assert [x["answer"] for x in parse_qa_lines(many)] == ["a0", "a1", "a2", "a3"]


def test_qa_augmentation_prompt_and_kind(base):
    from doe_ext.dmoe.augment import fewshot_qa_prompt, qa_demonstration

    demo = qa_demonstration()
    prompt = fewshot_qa_prompt("Basalt is dark.", demo)
    assert prompt.startswith(f"Passage: {demo['passage']}\n") and prompt.endswith("Passage: Basalt is dark.\n"
                                                                                  "Questions and answers about the passage:\nQ:")
    assert all(f"Q: {x['question']}\nA: {x['answer']}\n" in prompt for x in demo["qa"])
    augs = augment_documents(base, ["The sea otter floats.", "Basalt is dark."], kind="qa")
    assert all(a.kind == "qa" and a.attempts == 1 and a.rewrite == "" and len(a.qa) <= 4 for a in augs)


def test_sentence_passages_spread_over_a_long_document():
    from doe_ext.dmoe.augment import sentence_passages

    text = " ".join(f"Fact {i} holds." for i in range(25))
    got = sentence_passages(text, limit=5)
    assert got == ["Fact 0 holds.", "Fact 6 holds.", "Fact 12 holds.", "Fact 18 holds.", "Fact 24 holds."]
    assert sentence_passages("One. Two? Three!", limit=5) == ["One.", "Two?", "Three!"]


def test_parse_question_keeps_the_first_line():
    from doe_ext.dmoe.augment import parse_question

    assert parse_question(" Who keeps it?\nA: the team") == "Who keeps it?" and parse_question("\nQ: x") == ""


def test_sentences_augmentation_asks_about_each_sentence(base):
    """At most one question per sentence (none when the model's first line is empty, or repeats an
    earlier question); each question's kept "answer" is its sentence, in the document's order."""
    augs = augment_documents(base, ["The sea otter floats. It eats clams.", "Basalt is dark."], kind="sentences")
    assert [a.kind for a in augs] == ["sentences", "sentences"] and [a.attempts for a in augs] == [1, 1]
    order = {"The sea otter floats.": 0, "It eats clams.": 1, "Basalt is dark.": 0}
    for a in augs:
        kept = [order[q["answer"]] for q in a.qa]
        assert kept == sorted(set(kept)) and all(q["question"] and "\n" not in q["question"] for q in a.qa)
