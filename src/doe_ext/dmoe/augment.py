"""Document augmentation (PRAG's recipe, DMoE §4.1.3 and App. C.1) and the prompt format shared by
expert training, ``ask`` and evaluation.

The base model writes one rewrite and three QA pairs per document with the App. C prompts. Its JSON
does not always parse: the QA prompt is retried (greedy first, then seeded sampling) a bounded number
of times, and a document whose every try fails keeps its rewrite and no QA pairs (recorded as such).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from doe_ext import threads
from doe_ext.dmoe.recipe import AUGMENTATIONS

REWRITE_PROMPT = (
    "Rewrite the following passage. While keeping the entities, proper nouns, and key details such as names, "
    "locations, and terminology intact, create a new version of the text that expresses the same ideas in a "
    "different way. Make sure the revised passage is distinct from the original one, but preserves the core "
    "meaning and relevant information.\nPassage: {passage}")
QA_PROMPT = (
    "I will provide a passage of text, and you need to generate three different questions based on the content "
    "of this passage. Each question should be answerable using the information provided in the passage. "
    "Additionally, please provide an appropriate answer for each question derived from the passage.\n"
    "You need to generate the question and answer in the following format:\n"
    '[{{"question": "What is the capital of France?", "answer": "Paris", '
    '"full_answer": "The capital of France is Paris."}},]\n'
    "This list should have at least three elements. You only need to output this list in the above format.\n"
    "Passage: {passage}")
QA_INSTRUCTION = ("You should answer the question by referring to the knowledge provided below and integrating "
                  "your own knowledge.")
QA_DEMONSTRATION = Path(__file__).with_name("data") / "qa-demonstration.json"


def qa_demonstration() -> dict:
    """The one worked example the ``"qa"`` augmentation shows the base model (a passage and its QA pairs)."""
    return json.loads(QA_DEMONSTRATION.read_text())


def fewshot_qa_prompt(passage: str, demo: dict) -> str:
    """Plain text a small model continues with question / answer lines about ``passage``."""
    def block(p, qa):
        return f"Passage: {p}\nQuestions and answers about the passage:\n" + "".join(
            f"Q: {x['question']}\nA: {x['answer']}\n" for x in qa)
    return block(demo["passage"], demo["qa"]) + "\n" + block(passage, []) + "Q:"


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    """``text`` cut after each ``.``, ``!`` or ``?`` that a space follows."""
    return [s for s in _SENTENCE.split(text.strip()) if s]


# The ``"sentences"`` augmentation asks about at most this many sentences of a document (spread evenly).
SENTENCE_QUESTIONS = 10


def sentence_passages(text: str, limit: int = SENTENCE_QUESTIONS) -> list[str]:
    """The sentences of ``text`` the ``"sentences"`` augmentation asks about: all of them, or ``limit``
    spread evenly over a longer document (its first and last included)."""
    sents = sentences(text)
    if len(sents) <= limit:
        return sents
    return [sents[round(i * (len(sents) - 1) / (limit - 1))] for i in range(limit)]


def parse_question(text: str) -> str:
    """The question a continuation of :func:`fewshot_qa_prompt` (after its ``Q:``) asks: its first line."""
    return text.split("\n", 1)[0].strip()


def parse_qa_lines(text: str, limit: int = 4) -> list[dict[str, str]]:
    """``Q: ... / A: ...`` pairs from a continuation of :func:`fewshot_qa_prompt` (it starts after the
    first ``Q:``), up to the first blank line; a pair with an empty side or a question already asked
    is dropped (a small model repeats itself)."""
    text = "Q:" + text.split("\n\n", 1)[0]
    out, seen = [], set()
    for m in re.finditer(r"^Q:(.*)\nA:(.*)$", text, re.M):
        q, a = m.group(1).strip(), m.group(2).strip()
        if q and a and q.lower() not in seen:
            seen.add(q.lower())
            out.append({"question": q, "answer": a, "full_answer": a})
    return out[:limit]


@dataclass(frozen=True)
class Document:
    """A knowledge unit: one expert is trained on it. ``title`` names its subject (distillation asks
    about it); the id stands in when there is none."""

    id: str
    text: str
    title: str | None = None

    @property
    def subject(self) -> str:
        return self.title or self.id


@dataclass
class Augmentation:
    """What the base model wrote for one document (``kind="none"``: nothing)."""

    kind: str = "none"
    rewrite: str = ""
    qa: list[dict[str, str]] = field(default_factory=list)
    attempts: int = 0  # QA prompt tries used (0: not asked)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "Augmentation":
        return cls(**json.loads(s))

    def surrogate(self, text: str) -> str:
        """The expert's text for BM25 (DMoE §3.2): the document plus its augmentations."""
        parts = [text, self.rewrite] + [f"{q['question']} {q['answer']}" for q in self.qa]
        return "\n".join(p for p in parts if p)


def chat(tokenizer, user: str, answer: str | None = None) -> str:
    """One user turn (and the assistant's answer, when given) in the tokenizer's chat template, or as
    plain ``user\\n`` text for a tokenizer without one. Without ``answer`` the text ends where the
    model's answer starts."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": user}]
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        prompt = user + "\n"
    return prompt if answer is None else prompt + answer


def qa_prompt(tokenizer, question: str, passages: list[str] | None = None) -> str:
    """The question prompt every method uses (PRAG's layout): passages first when given, then the question."""
    user = f"Question: {question}\nAnswer:"
    if passages:
        ctx = "\n".join(f"Passage {i + 1}: {p}" for i, p in enumerate(passages))
        user = f"{QA_INSTRUCTION}\n{ctx}\n\n{user}"
    return chat(tokenizer, user)


# Demonstrations of short answers (general knowledge, written by hand, unrelated to any evaluation set):
# the distillation teacher and student see them, so distilled experts are asked after them too
# (expert_shots); the answers the evaluation wants are short.
SHOTS = (("Who designed the Eiffel Tower?", "the company of Gustave Eiffel",
          "The Eiffel Tower in Paris was designed and built by the company of Gustave Eiffel for the 1889 World's Fair."),
         ("What category of instrument is the cello?", "string",
          "The cello is a bowed string instrument of the violin family, larger than the viola."),
         ("Where is the Atacama Desert?", "northern Chile",
          "The Atacama Desert lies in northern Chile, between the Pacific Ocean and the Andes."))


def expert_shots(recipe) -> tuple[tuple[str, str, str], ...]:
    """The demonstrations a bank's experts were trained after, so the prompt they are asked in: the
    distill objective's :data:`SHOTS` (plain ``Question: / Answer:`` lines, answers ending at a line
    break); none for next-token experts, which PRAG's layout trains in the chat template
    (:func:`qa_prompt`). Asked in another layout, experts taught short answers drift: on fiction-v1's
    dev split the default recipe's DMoE gave 21 of 80 degenerate answers in the chat template and 1 of
    80 after these demonstrations, with the same hit rate (``reports/dmoe-recipes/reader``)."""
    return SHOTS if recipe.objective == "distill" else ()


def ask_prompt(tokenizer, question: str, passages: list[str] | None = None,
               shots: tuple[tuple[str, str, str], ...] | list = ()) -> str:
    """The question prompt: after ``shots`` demonstrations (:func:`fewshot_prompt`, the answer ends at a
    line break), or without them the chat template (:func:`qa_prompt`, the answer ends with EOS)."""
    return fewshot_prompt(question, passages, shots) if shots else qa_prompt(tokenizer, question, passages)


def fewshot_prompt(question: str, passages: list[str] | None = None,
                   shots: list[tuple[str, str, str]] = ()) -> str:
    """The evaluation's prompt: plain text, no chat template, ``shots`` demonstrations (question,
    answer, passage) before the question, each with its passage when ``passages`` are given. Chosen on
    the dev split of the Debian set: SmolLM2-135M-Instruct answers a chat-template prompt in sentences
    (gold-passage EM 0.04 zero-shot, 0.29 with four demonstrations as chat turns); this gives 0.54."""
    with_ctx = bool(passages)
    demo = "".join((f"Passage: {p}\n" if with_ctx else "") + f"Question: {q}\nAnswer: {a}\n\n" for q, a, p in shots)
    ctx = "".join(f"Passage: {p}\n" for p in passages or [])
    return f"{demo}{ctx}Question: {question}\nAnswer:"


def parse_qa(text: str) -> list[dict[str, str]]:
    """QA pairs from the model's reply: the JSON list if it parses, else every ``{...}`` object that does.
    Items without a non-empty string ``question`` and ``answer`` are dropped; at most three are kept."""
    candidates: list[Any] = []
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        try:
            got = json.loads(text[start:end + 1])
            candidates = got if isinstance(got, list) else []
        except json.JSONDecodeError:
            candidates = []
    if not candidates:
        for m in re.finditer(r"\{[^{}]*\}", text):
            try:
                candidates.append(json.loads(m.group(0)))
            except json.JSONDecodeError:
                continue
    out = []
    for c in candidates:
        if not isinstance(c, dict):
            continue
        q, a = c.get("question"), c.get("answer")
        if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
            full = c.get("full_answer")
            out.append({"question": q.strip(), "answer": a.strip(),
                        "full_answer": full.strip() if isinstance(full, str) and full.strip() else a.strip()})
    return out[:3]


class _Rebalance(StoppingCriteria):
    """Stops nothing: transformers' per-step hook, for :func:`doe_ext.threads.rebalance` (cores back to a
    command started beside this one; a no-op unless the process claimed its threads)."""

    def __call__(self, input_ids, scores, **kwargs):
        threads.rebalance()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_text(base, prompts: list[str], max_new_tokens: int, sample_seed: int | None = None,
                  stop_strings: list[str] | None = None) -> list[str]:
    """Batched generation with the base model (left padding); greedy unless ``sample_seed`` is given;
    a sequence ends at EOS or at one of ``stop_strings``."""
    tok = base.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True).to(base.device)  # a sequence start: BOS where the model has one
    finally:
        tok.padding_side = side
    limit = base.max_positions
    if limit is not None and enc["input_ids"].shape[1] + max_new_tokens > limit:
        raise ValueError(f"augment: a prompt of {enc['input_ids'].shape[1]} tokens plus max_new_tokens="
                         f"{max_new_tokens} exceeds the model's context of {limit} positions (shorten the document)")
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                  stopping_criteria=StoppingCriteriaList([_Rebalance()]))
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tok)
    if sample_seed is None:
        kwargs.update(do_sample=False)
    else:
        kwargs.update(do_sample=True, temperature=0.7, top_p=0.95)
    with torch.random.fork_rng(devices=[]):
        if sample_seed is not None:
            torch.manual_seed(sample_seed)
        out = base.model.generate(**enc, **kwargs)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def augment_documents(base, texts: list[str], kind: str = "model", retries: int = 3, seed: int = 0,
                      max_new_tokens: int = 256) -> list[Augmentation]:
    """Augment a batch of documents (one rewrite, up to three QA pairs each).

    Args:
        kind: ``"model"`` (the base model writes them with the App. C prompts), ``"qa"`` (the base model
            writes up to four QA pairs as plain lines after one worked example, :func:`qa_demonstration`;
            no rewrite; for models too small to write App. C's JSON), ``"sentences"`` (the same prompt
            on each sentence alone, :func:`sentence_passages`: one question per sentence, so every fact
            is asked about; its answer is kept as the sentence, since only the question is used) or
            ``"none"``.
        retries: QA prompt tries per document (greedy, then sampling seeded by ``seed`` and the try).
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"augment: `kind` must be one of {AUGMENTATIONS}, got {kind!r}")
    if retries < 1:
        raise ValueError(f"augment: `retries` must be >= 1, got {retries}")
    if kind == "none":
        return [Augmentation() for _ in texts]
    tok = base.tokenizer
    if kind == "sentences":  # one question per sentence, greedy; its "answer" is the sentence itself
        passages = [sentence_passages(t) for t in texts]
        flat = [p for ps in passages for p in ps]
        asked = iter(generate_text(base, [fewshot_qa_prompt(p, qa_demonstration()) for p in flat], 32,
                                   stop_strings=["\n"]))
        out = []
        for ps in passages:
            qa, seen = [], set()
            for p in ps:
                q = parse_question(next(asked))
                if q and q.lower() not in seen:
                    seen.add(q.lower())
                    qa.append({"question": q, "answer": p, "full_answer": p})
            out.append(Augmentation(kind="sentences", qa=qa, attempts=1))
        return out
    if kind == "qa":  # one greedy try: the pairs parse from plain lines, so there is nothing to retry
        demo = qa_demonstration()
        replies = generate_text(base, [fewshot_qa_prompt(t, demo) for t in texts], 96, stop_strings=["\n\n"])
        return [Augmentation(kind="qa", qa=parse_qa_lines(r), attempts=1) for r in replies]
    rewrites = generate_text(base, [chat(tok, REWRITE_PROMPT.format(passage=t)) for t in texts], max_new_tokens)
    augs = [Augmentation(kind="model", rewrite=r.strip()) for r in rewrites]
    todo = list(range(len(texts)))
    for attempt in range(retries):
        if not todo:
            break
        replies = generate_text(base, [chat(tok, QA_PROMPT.format(passage=texts[i])) for i in todo],
                                max_new_tokens, sample_seed=None if attempt == 0 else seed * 1000 + attempt)
        left = []
        for i, reply in zip(todo, replies):
            augs[i].attempts = attempt + 1
            augs[i].qa = parse_qa(reply)
            if not augs[i].qa:
                left.append(i)
        todo = left
    return augs
