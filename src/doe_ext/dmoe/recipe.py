"""How a bank's experts are made: one :class:`Recipe` (LoRA shape, training objective and settings,
augmentation), stored once in the bank and checked whenever experts are added to it.

Two objectives train an expert (docs/design.md#dmoe):

- ``"next_token"``: the DMoE paper's (PRAG's) next-token loss on the document and its augmentations
  (:func:`doe_ext.dmoe.instances.training_instances`).
- ``"distill"``: context distillation (:mod:`doe_ext.dmoe.distill`). The teacher is the frozen base
  with the document in its prompt, the student the base plus the expert without it; the expert is
  trained on ``KL(teacher || student)`` over the teacher's own answers (plus, with
  ``hidden_weight > 0``, the final hidden state's L1 distance relative to the teacher's).

:data:`RECIPES` names the two a user picks from: ``"default"``, the best on the dev split of our
evaluation (``benchmarks/results/history.md``, "DMoE recipes"), and ``"paper"``, the DMoE paper's own.
Plain Python (no torch): the command line reads it to build its parser.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace

OBJECTIVES = ("next_token", "distill")
DISTILL_LOSSES = ("kl", "sequence")
AUGMENTATIONS = ("model", "qa", "sentences", "none")
# What the distillation objective's instances are made of (doe_ext.dmoe.distill.distill_prompts).
INSTANCE_KINDS = ("chunks", "subject", "questions", "rewrites", "shuffled")


@dataclass(frozen=True)
class LoRAConfig:
    """An expert's shape (PEFT's convention: ``delta = (alpha / rank) * B @ A``).

    Args:
        rank: LoRA rank ``r`` (DMoE §4.1.3: 4).
        alpha: LoRA scaling numerator (DMoE: 16).
    """

    rank: int = 4
    alpha: float = 16.0

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"LoRAConfig: `rank` must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig: `alpha` must be > 0, got {self.alpha!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class RecipeError(ValueError):
    """A recipe that is invalid, or that differs from the one a bank was built with."""


@dataclass(frozen=True)
class Recipe:
    """Everything that decides an expert's weights, besides its document and the base model.

    Args:
        lora: rank and alpha (DMoE: 4 / 16).
        objective: ``"next_token"`` or ``"distill"`` (see the module docstring).
        augment: the augmentation of each document: ``"model"`` (the base writes a rewrite and three QA
            pairs with App. C's JSON prompts), ``"qa"`` (the base writes up to four QA pairs as plain
            lines after one worked example), ``"sentences"`` (the base writes a question about each
            sentence, after the same example) or ``"none"``. With ``"distill"``, the QA pairs' questions
            (never their answers) become distillation prompts when ``instances`` has ``"questions"``.
        lr: AdamW learning rate (constant).
        epochs: passes over each document's instances.
        batch_size: instances per expert per optimizer step.
        weight_decay: AdamW's decoupled decay.
        max_length: instances are cut to this many tokens.
        seed: with the expert id, seeds the expert's LoRA init.
        instances: ``"distill"`` only: the kinds of instances (:data:`INSTANCE_KINDS`).
        answer_tokens: ``"distill"`` only: the teacher answers each prompt with at most this many tokens.
        hidden_weight: ``"distill"`` only: weight of the final-hidden-state term (with ``"kl"``).
        distill_loss: ``"distill"`` only: ``"kl"``, ``KL(teacher || student)`` of the next-token
            distributions at every target token; or ``"sequence"``, cross-entropy on the teacher's own
            tokens (sequence-level distillation, Kim & Rush 2016: the teacher's greedy answer as the label).
    """

    lora: LoRAConfig = field(default_factory=LoRAConfig)
    objective: str = "next_token"
    augment: str = "none"
    lr: float = 3e-4
    epochs: int = 1
    batch_size: int = 1
    weight_decay: float = 0.01
    max_length: int = 512
    seed: int = 0
    instances: tuple[str, ...] = ()
    answer_tokens: int = 24
    hidden_weight: float = 0.0
    distill_loss: str = "kl"

    def __post_init__(self):
        if not isinstance(self.lora, LoRAConfig):
            raise RecipeError(f"Recipe: `lora` must be a LoRAConfig, got {type(self.lora).__name__}")
        for name in ("epochs", "batch_size", "max_length", "answer_tokens"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise RecipeError(f"Recipe: `{name}` must be a positive int, got {v!r}")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool)):
            raise RecipeError(f"Recipe: `seed` must be an int, got {self.seed!r}")
        if not self.lr > 0:
            raise RecipeError(f"Recipe: `lr` must be > 0, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise RecipeError(f"Recipe: `weight_decay` must be >= 0, got {self.weight_decay!r}")
        if not self.hidden_weight >= 0:
            raise RecipeError(f"Recipe: `hidden_weight` must be >= 0, got {self.hidden_weight!r}")
        if self.objective not in OBJECTIVES:
            raise RecipeError(f"Recipe: `objective` must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.augment not in AUGMENTATIONS:
            raise RecipeError(f"Recipe: `augment` must be one of {AUGMENTATIONS}, got {self.augment!r}")
        object.__setattr__(self, "instances", tuple(self.instances))
        bad = [k for k in self.instances if k not in INSTANCE_KINDS]
        if bad:
            raise RecipeError(f"Recipe: `instances` must be drawn from {INSTANCE_KINDS}, got {bad[0]!r}")
        if self.distill_loss not in DISTILL_LOSSES:
            raise RecipeError(f"Recipe: `distill_loss` must be one of {DISTILL_LOSSES}, got {self.distill_loss!r}")
        if self.objective == "distill":
            if self.distill_loss == "sequence" and self.hidden_weight:
                raise RecipeError("Recipe: `hidden_weight` needs the teacher's hidden states: distill_loss 'kl'")
            if not self.instances:
                raise RecipeError("Recipe: the distill objective needs at least one kind in `instances`")
            if "questions" in self.instances and self.augment == "none":
                raise RecipeError("Recipe: `instances` has 'questions' but `augment` is 'none' (no questions to ask)")
        elif self.instances or self.hidden_weight or self.distill_loss != "kl":
            raise RecipeError("Recipe: `instances`, `hidden_weight` and `distill_loss` belong to the distill "
                              f"objective, not to {self.objective!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["instances"] = list(self.instances)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecipeError(f"Recipe: unknown field {unknown[0]!r} (fields: {', '.join(sorted(known))})")
        d = dict(d)
        if "lora" in d:
            d["lora"] = LoRAConfig(**d["lora"])
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "Recipe":
        return cls.from_dict(json.loads(s))

    def differences(self, other: "Recipe") -> list[str]:
        """``name: mine != other's`` for every field that differs (LoRA's rank and alpha named apart)."""
        a, b = self.to_dict(), other.to_dict()
        a.update({f"lora.{k}": v for k, v in a.pop("lora").items()})
        b.update({f"lora.{k}": v for k, v in b.pop("lora").items()})
        return [f"{k}={a[k]!r} (asked: {b[k]!r})" for k in sorted(a) if a[k] != b[k]]

    def replace(self, **changes) -> "Recipe":
        return replace(self, **changes)

    def next_token(self, **changes) -> "Recipe":
        """This recipe with the next-token objective (the distill-only fields back at their defaults)."""
        return replace(self, objective="next_token", instances=(), hidden_weight=0.0, distill_loss="kl", **changes)


# The DMoE paper's recipe (§4.1.3, PRAG's code): next-token loss on the document, one rewrite and three
# QA pairs written by the base with App. C's prompts, rank 4 / alpha 16, one epoch at PRAG's 3e-4.
PAPER = Recipe(objective="next_token", augment="model", lr=3e-4, epochs=1)
# The best on the dev split (benchmarks/results/history.md, "DMoE recipes"; `python -m experiments.dmoe_report
# recipes` reruns both studies): context distillation, sequence-level, 16 epochs at 3e-3 (8 under-fit,
# 24 over-fit; 1e-2 was worse at every epoch count). KL at 8 epochs is inside its intervals (oracle EM
# 0.111 on 72 questions, against 0.083 at 8 epochs and 0.153 at 16) at 2-4x the training time per epoch;
# KL was not tried beyond 8 epochs.
DEFAULT = Recipe(objective="distill", augment="qa", lr=3e-3, epochs=16, instances=("subject", "questions"),
                 answer_tokens=24, distill_loss="sequence")
RECIPES = {"default": DEFAULT, "paper": PAPER}
# The SFT-LoRA baseline (one adapter on every document's instances) trains with the bank's recipe but
# this many times its batch per optimizer step: as many instances a step as that many experts take
# together (issue 22; at 1 it took ~58 min for 400 documents). Every path that trains it uses this.
SFT_DOCS_PER_STEP = 8
