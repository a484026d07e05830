"""Training instances: token sequences with the first position whose next token is a target, for
both objectives (PRAG's instances here; the distillation's in :mod:`doe_ext.dmoe.distill`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from doe_ext.dmoe.augment import Augmentation, qa_prompt


@dataclass
class Instance:
    """One training sequence: token ids and the first position whose next token is a target. A
    distillation instance also has the teacher's ids and first target position: its last targets are
    the student's, token for token."""

    ids: list[int]
    loss_start: int
    teacher: list[int] | None = None
    teacher_start: int | None = None

    @property
    def targets(self) -> int:
        return len(self.ids) - 1 - self.loss_start


def starts(tokenizer) -> Callable[[str], list[int]]:
    """Text -> ids of a sequence that starts with it (the tokenizer's BOS where it adds one: Gemma)."""
    return lambda s: tokenizer(s)["input_ids"]


def continues(tokenizer) -> Callable[[str], list[int]]:
    """Text -> ids that continue a sequence (no special tokens)."""
    return lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]


def training_instances(tokenizer, text: str, aug: Augmentation, max_length: int) -> list[Instance]:
    """PRAG's instances for one document: the passage and its rewrite as plain text (loss on every
    token), then for the first half of the QA pairs the question with the passage and with the
    rewrite in the prompt, for the rest the question alone (loss on the answer). Sequences start as
    the tokenizer starts them (BOS where the model has one); answers continue them."""
    enc, cont = starts(tokenizer), continues(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = [Instance(enc(t)[:max_length], 0) for t in (text, aug.rewrite) if t]
    half = (len(aug.qa) + 1) // 2
    for j, qa in enumerate(aug.qa):
        contexts = [[p] for p in (text, aug.rewrite) if p] if j < half else [None]
        for ctx in contexts:
            prompt = enc(qa_prompt(tokenizer, qa["question"], ctx))
            ids = (prompt + cont(" " + qa["answer"]) + eos)[:max_length]
            if len(ids) > len(prompt):
                out.append(Instance(ids, len(prompt) - 1))
    return [i for i in out if len(i.ids) - 1 > i.loss_start]
