"""Context-distilled experts: the instances of the ``"distill"`` objective and their teacher.

The teacher is the frozen base with the document in its prompt; the student is the base plus the
expert, without it. Each instance is a pair of token sequences ending in the same target tokens, the
teacher's prefix holding the document (or the part of it before the target), the student's not; the
expert is trained on ``KL(teacher || student)`` over the target tokens (:mod:`doe_ext.dmoe.train`).
Nothing here needs a generator the base cannot run: the targets are the document's own text or the
teacher's own greedy answers, and the only text the base writes besides them is the ``"qa"``
augmentation's questions (plain ``Q:`` lines; their answers are never used).

What we took from the literature:

- prompt distillation (Kujanpää et al. 2024, "Knowledge injection via prompt distillation"): the
  teacher answers questions with the document in its prompt, the student learns the teacher's whole
  output distribution on those answers without it; variety of questions matters more than their number;
- deep context distillation (Caccia et al. 2025, "Training plug-n-play knowledge modules with deep
  context distillation", ``microsoft/mttl``): the teacher sees a preceding chunk of the document and
  the student does not, with KL on the next chunk's tokens plus an L1 term on hidden states normalised
  by the teacher's. Our experts sit on the last MLP only, so the hidden-state term is on the final
  hidden state (``Recipe.hidden_weight``).

Instance kinds (``Recipe.instances``):

- ``"chunks"``: each sentence of the document after the first; the teacher sees the sentences before it.
- ``"subject"``: generic prompts about the document's subject (its title, else its id), :data:`SUBJECT_PROMPTS`.
- ``"questions"``: the questions of the document's augmentation (the base writes them).
- ``"rewrites"``: the augmentation's rewrite of the document; the teacher sees the document before it.
- ``"shuffled"``: :data:`SHUFFLES` copies of the document, each with its sentences in another seeded
  order (Physics of LMs 3.1's permuted biographies); the teacher sees the document before it.

The prompts use the evaluation harness's plain ``Question: ...\\nAnswer:`` layout
(:func:`doe_ext.dmoe.augment.fewshot_prompt`) after three general-knowledge demonstrations of short
answers (:data:`SHOTS`, each with its passage in the teacher's prompt); none copies an evaluation
question's wording.
"""
from __future__ import annotations

import math
import random

from doe_ext.dmoe.augment import SHOTS, Augmentation, Document, fewshot_prompt, sentences
from doe_ext.dmoe.base import BaseLM
from doe_ext.dmoe.recipe import Recipe
from doe_ext.dmoe.instances import Instance, continues, starts, training_instances

# Generic questions about any subject (who / what / where / when / which), written for no particular
# kind of document; the teacher's answers, not these wordings, carry the document's facts.
SUBJECT_PROMPTS = ("What is {s}?", "Who is behind {s}?", "Who is responsible for {s}?", "Where can {s} be found?",
                   "What kind of thing is {s}?", "What category does {s} belong to?", "What does {s} do?",
                   "When did {s} happen or appear?", "Which web address belongs to {s}?",
                   "Describe {s} in one sentence.")
SHUFFLES = 4


def distill_prompts(doc: Document, aug: Augmentation, recipe: Recipe) -> list[str]:
    """The questions the teacher answers for ``doc``: subject prompts, then the augmentation's questions."""
    out = []
    if "subject" in recipe.instances:
        out += [p.format(s=doc.subject) for p in SUBJECT_PROMPTS]
    if "questions" in recipe.instances:
        out += [q["question"] for q in aug.qa]
    return list(dict.fromkeys(out))


def teacher_answers(base: BaseLM, passages: list[str], questions: list[str], max_new_tokens: int) -> list[str]:
    """The teacher's greedy answers (the base, the passage in its prompt), up to a line break. The
    questions about one passage run as one batch whose common prefix (the demonstrations and the
    passage) runs once (:meth:`doe_ext.dmoe.DMoE.generate` without a bank)."""
    from doe_ext.dmoe.model import DMoE, line_break_tokens

    teacher, stop = DMoE(base, None, tau=math.inf), line_break_tokens(base.tokenizer)
    out, by_passage = [""] * len(questions), {}
    for i, p in enumerate(passages):
        by_passage.setdefault(p, []).append(i)
    for p, rows in by_passage.items():
        for i, g in zip(rows, teacher.generate([fewshot_prompt(questions[i], [p], SHOTS) for i in rows],
                                               max_new_tokens, stop_tokens=stop)):
            out[i] = g.text.split("\n", 1)[0].strip()
    return out


def _pair(tok, teacher_prefix: str, student_prefix: str, target: str, max_length: int) -> Instance | None:
    """``max_length`` bounds the student's sequence, the one trained; the teacher's holds the whole
    document however long (it is only run forward), so a long document keeps its instances."""
    enc = starts(tok)
    t, s = enc(teacher_prefix), enc(student_prefix)
    y = continues(tok)(target)[:max_length - len(s)]
    if not y or not s:
        return None
    return Instance(s + y, len(s) - 1, t + y, len(t) - 1)


def distill_instances(base: BaseLM, items: list[tuple[Document, Augmentation]], recipe: Recipe) -> list[list[Instance]]:
    """Per document, its distillation instances (the teacher's answers generated here, in batches)."""
    tok = base.tokenizer
    asked = [(n, q) for n, (d, a) in enumerate(items) for q in distill_prompts(d, a, recipe)]
    answers = teacher_answers(base, [items[n][0].text for n, _ in asked], [q for _, q in asked], recipe.answer_tokens)
    out: list[list[Instance | None]] = [[] for _ in items]
    for (n, q), answer in zip(asked, answers):
        if answer:
            out[n].append(_pair(tok, fewshot_prompt(q, [items[n][0].text], SHOTS), fewshot_prompt(q, None, SHOTS),
                                f" {answer}\n", recipe.max_length))
    for n, (d, a) in enumerate(items):
        lead = f"{d.subject}:"
        if "chunks" in recipe.instances:
            sents = sentences(d.text)
            for i in range(1, len(sents)):
                out[n].append(_pair(tok, f"{lead} {' '.join(sents[:i])}", lead, " " + sents[i], recipe.max_length))
        if "shuffled" in recipe.instances:
            sents, rng = sentences(d.text), random.Random(d.text)  # seeded by the text: the instances' cache key
            for _ in range(SHUFFLES):
                order = " ".join(rng.sample(sents, len(sents)))
                out[n].append(_pair(tok, f"Passage: {d.text}\n{lead}", lead, " " + order, recipe.max_length))
        if "rewrites" in recipe.instances and a.rewrite:
            out[n].append(_pair(tok, f"Passage: {d.text}\n{lead}", lead, " " + a.rewrite, recipe.max_length))
    return [[i for i in doc if i is not None] for doc in out]


def instances_for(base: BaseLM, items: list[tuple[Document, Augmentation]], recipe: Recipe) -> list[list[Instance]]:
    """Each document's instances under ``recipe``'s objective (distillation runs its teacher here)."""
    if recipe.objective == "distill":
        return distill_instances(base, items, recipe)
    return [training_instances(base.tokenizer, d.text, a, recipe.max_length) for d, a in items]
