"""The knowledge reader: one LoRA per base and bank recipe, shared by every expert of a bank, active
wherever experts are (the Knowledge Extractor of Caccia et al. 2025, "Training plug-n-play knowledge
modules with deep context distillation", ``microsoft/mttl``).

An expert is trained alone to carry its document; the reader is trained once, across many documents'
experts, to read what the routed experts carry: it sits on the same projections as the experts (the
last MLP, so a trigger still re-runs only that block, the final norm and the head) and joins every
non-empty set of experts as one more slot at its own scale (``reader.lora.scale``), so
``W' = W + sum_e w_e s B_e A_e + s_R B_R A_R``. A row without experts is the base model.

Training (:func:`doe_ext.dmoe.reader_training.train_reader`) uses a bank of **train-split** documents (never a dev or test
document) and questions about them with their answers: per question, the experts are routed as at
inference (the gold expert with BM25's best distractors, composed by the bank's default composition),
the prompt is the closed-book prompt or, for a ``with_document`` share of the questions, the
retrieved documents too (so that with both the reader follows what the prompt says), and the loss is
the answer's next-token cross-entropy with base and experts frozen. The residual entering the last
MLP does not depend on experts or reader, so it is computed once per question.

A reader is a safetensors file whose metadata names the base fingerprint and the bank recipe it was
trained for; a bank stores it content-addressed (:meth:`doe_ext.dmoe.bank.ExpertBank.set_reader`) and
refuses one made for another base or recipe, naming what differs. The package ships the readers of
its default bases for the default recipe (:func:`shipped_reader`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from doe_ext.dmoe.recipe import LoRAConfig, Recipe, RecipeError

READER_ID = "/reader"  # its slot in a set of experts; never an expert id (ids cannot hold '/')
FORMAT = "doe_ext.dmoe.reader/1"
SHIPPED = Path(__file__).with_name("readers")


class ReaderError(ValueError):
    """A reader that does not fit the bank or base it is given to, or a file that is not a reader."""


@dataclass(frozen=True)
class ReaderRecipe:
    """How a reader is trained.

    Args:
        lora: its rank and alpha (its own; the experts keep theirs).
        lr: AdamW learning rate (constant).
        epochs: passes over the questions.
        batch_size: questions per optimizer step.
        top_k: experts per question: the gold one and ``top_k - 1`` of BM25's best others.
        with_document: the share of questions whose prompt also holds the routed documents.
        weight_decay: AdamW's decoupled decay.
        seed: the LoRA init, the order of the questions and which of them get the documents.
        max_length: instances are cut to this many tokens.
    """

    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(rank=16, alpha=32.0))
    lr: float = 1e-3
    epochs: int = 6
    batch_size: int = 8
    top_k: int = 3
    with_document: float = 0.25
    weight_decay: float = 0.0
    seed: int = 0
    max_length: int = 512

    def __post_init__(self):
        for name in ("epochs", "batch_size", "top_k", "max_length"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ReaderError(f"ReaderRecipe: `{name}` must be a positive int, got {v!r}")
        if not self.lr > 0:
            raise ReaderError(f"ReaderRecipe: `lr` must be > 0, got {self.lr!r}")
        if not 0 <= self.with_document <= 1:
            raise ReaderError(f"ReaderRecipe: `with_document` must be in [0, 1], got {self.with_document!r}")
        if not self.weight_decay >= 0:
            raise ReaderError(f"ReaderRecipe: `weight_decay` must be >= 0, got {self.weight_decay!r}")


@dataclass
class Reader:
    """A trained reader: LoRA factors per site key (``"<proj>.lora_a" [r, in]``, ``"<proj>.lora_b" [out, r]``),
    its shape, and what it reads: the base fingerprint and the bank recipe of the experts it was trained with."""

    tensors: dict[str, Tensor]
    lora: LoRAConfig
    fingerprint: str
    recipe: Recipe
    name: str = "reader"
    info: dict = field(default_factory=dict)  # how it was trained (free-form, kept in the file)

    def to_bytes(self) -> bytes:
        """The reader as a safetensors file (float32, the header's keys sorted: equal readers, equal bytes)."""
        from doe_ext.dmoe.files import canonical_safetensors

        meta = {"format": FORMAT, "name": self.name, "fingerprint": self.fingerprint,
                "recipe": self.recipe.to_json(), "lora": json.dumps(asdict(self.lora), sort_keys=True),
                "info": json.dumps(self.info, sort_keys=True)}
        weights = {k: v.detach().float().contiguous().cpu() for k, v in sorted(self.tensors.items())}
        return canonical_safetensors(st_save(weights, metadata=meta))

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "reader") -> "Reader":
        try:
            n = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
            tensors = {k: v.float() for k, v in st_load(data).items()}
        except Exception as e:  # safetensors only, never pickle
            raise ReaderError(f"{where}: not a safetensors file ({e})") from None
        return cls._from(meta, tensors, where)

    @classmethod
    def _from(cls, meta: dict, tensors: dict[str, Tensor], where: str) -> "Reader":
        if meta.get("format") != FORMAT:
            raise ReaderError(f"{where}: format {meta.get('format')!r}, expected {FORMAT!r} (not a reader)")
        try:
            recipe = Recipe.from_json(meta["recipe"])
            lora = LoRAConfig(**json.loads(meta["lora"]))
        except (KeyError, TypeError, ValueError, RecipeError) as e:
            raise ReaderError(f"{where}: its metadata does not describe a reader ({e})") from None
        return cls(tensors, lora, meta["fingerprint"], recipe, meta.get("name", "reader"),
                   json.loads(meta.get("info", "{}")))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Reader":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such reader file")
        return cls.from_bytes(path.read_bytes(), str(path))

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def check(self, fingerprint: str, recipe: Recipe, names: tuple[str, ...] | None = None,
              where: str = "bank") -> None:
        """Refuse to serve experts of another base or recipe (naming every field that differs), or a
        site whose projections it has no factors for."""
        if fingerprint != self.fingerprint:
            raise ReaderError(f"reader {self.name!r} was trained for base fingerprint {self.fingerprint}, but the "
                              f"{where} is for {fingerprint}")
        diff = self.recipe.differences(recipe)
        if diff:
            raise ReaderError(f"reader {self.name!r} was trained for experts of another recipe than the {where}'s: "
                              + ", ".join(diff).replace("(asked:", f"({where}:"))
        missing = [n for n in names or () if f"{n}.lora_a" not in self.tensors or f"{n}.lora_b" not in self.tensors]
        if missing:
            raise ReaderError(f"reader {self.name!r} has no factors for the projections {', '.join(missing)}")

    def weight(self, expert_scale: float) -> float:
        """Its composition weight in a set whose slots are scaled by the experts' ``alpha / rank``, so that
        its delta carries its own scale."""
        return self.lora.scale / expert_scale


def shipped_reader(fingerprint: str, recipe: Recipe) -> Reader | None:
    """The reader shipped with the package for this base and recipe, if there is one."""
    for path in sorted(SHIPPED.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") == FORMAT and meta.get("fingerprint") == fingerprint and \
                meta.get("recipe") and not Recipe.from_json(meta["recipe"]).differences(recipe):
            return Reader.load(path)
    return None
