"""The knowledge reader: one LoRA per base and bank recipe, shared by every expert of a bank, active
wherever experts are (the Knowledge Extractor of Caccia et al. 2025, "Training plug-n-play knowledge
modules with deep context distillation", ``microsoft/mttl``).

An expert is trained alone to carry its document; the reader is trained once, across many documents'
experts, to read what the routed experts carry: it sits on the same projections as the experts (the
last MLP, so a trigger still re-runs only that block, the final norm and the head) and joins every
non-empty set of experts as one more slot at its own scale (``reader.lora.scale``), so
``W' = W + sum_e w_e s B_e A_e + s_R B_R A_R``. A row without experts is the base model.

Training (:func:`train_reader`) uses a bank of **train-split** documents (never a dev or test
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
import math
import random
import time
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
        from doe_ext.dmoe.bank import canonical_safetensors

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


# -- training ------------------------------------------------------------------------------------------
def routed_set(bank, question: str, gold: str, top_k: int) -> list[tuple[str, float]]:
    """The weighted set a question trains the reader with: the gold expert and BM25's best ``top_k - 1``
    others, with their BM25 scores (the gold's own, or the best score when BM25 does not find it),
    composed by DMoE's default composition."""
    from doe_ext.dmoe.routing import DEFAULT_COMPOSE, DEFAULT_TEMPERATURE, compose

    hits = bank.search(question, top_k + 16)
    scores = dict(hits)
    gold_score = scores.get(gold, hits[0][1] if hits else 1.0)
    others = [(e, s) for e, s in hits if e != gold][:top_k - 1]
    ranked = sorted([(gold, gold_score)] + others, key=lambda h: -h[1])
    return compose(ranked, DEFAULT_COMPOSE, DEFAULT_TEMPERATURE)


def reader_instances(base, bank, questions: list[dict], recipe: ReaderRecipe, shots=None):
    """Per question: its training instance (prompt, then the first answer and its end; loss on the answer)
    and its weighted set of experts (:func:`routed_set`). The prompt is the one the reader will be asked
    in: after ``shots`` (the evaluation's ``--shots``), or by default in the layout of the bank's experts
    (:func:`~doe_ext.dmoe.augment.expert_shots`); an answer after demonstrations ends at a line break,
    one in the chat template with EOS."""
    from doe_ext.dmoe.augment import ask_prompt, expert_shots
    from doe_ext.dmoe.train import Instance, continues, starts

    tok = base.tokenizer
    enc, cont = starts(tok), continues(tok)
    shots = expert_shots(bank.recipe) if shots is None else shots
    end = cont("\n") if shots else [tok.eos_token_id] if tok.eos_token_id is not None else []
    rng = random.Random(recipe.seed)
    out = []
    for n, q in enumerate(questions):
        gold = q.get("doc_id")
        if gold not in bank:
            raise ReaderError(f"train_reader: question {n} ({q['question']!r}) names doc_id {gold!r}, "
                              f"which has no expert in {bank.path}")
        sets = routed_set(bank, q["question"], gold, recipe.top_k)
        passages = [bank.row(e).text for e, _ in sets] if rng.random() < recipe.with_document else None
        ids_p = enc(ask_prompt(tok, q["question"], passages, shots))
        ids = (ids_p + cont(" " + q["answers"][0]) + end)[:recipe.max_length]
        if len(ids) > len(ids_p):
            out.append((Instance(ids, len(ids_p) - 1), sets))
    return out


def train_reader(base, bank, questions: list[dict], recipe: ReaderRecipe = ReaderRecipe(), name: str = "reader",
                 progress: bool = False, shots=None) -> Reader:
    """A reader for ``bank``'s base and recipe, trained on ``questions`` (``question``, ``answers``,
    ``doc_id`` of an expert of ``bank``) with the bank's experts frozen (see the module docstring);
    ``shots`` as for :func:`reader_instances`."""
    from tqdm.auto import tqdm

    from doe_ext.dmoe.experts import ActiveExperts, ExpertSet, use_experts
    from doe_ext.dmoe.train import chunked_loss, residuals

    if not questions:
        raise ReaderError("train_reader: no questions to train on")
    bank.check_base(base.fingerprint)
    t0 = time.perf_counter()
    site = base.site.attach()
    items = reader_instances(base, bank, questions, recipe, shots)
    data = residuals(base, [i for i, _ in items])
    union = list(dict.fromkeys(e for _, s in items for e, _ in s))
    pos = {e: i for i, e in enumerate(union)}
    rank = max(recipe.lora.rank, bank.lora.rank)
    frozen = bank.load(union, site.names).pad_rank(rank).to(base.device)
    init = site.init_expert(recipe.lora, torch.Generator().manual_seed(recipe.seed))
    head, dt, dev = site.head, site.head.weight.dtype, base.device
    a = {n: init[f"{n}.lora_a"].to(dev, dt).requires_grad_() for n in site.names}
    b = {n: init[f"{n}.lora_b"].to(dev, dt).requires_grad_() for n in site.names}
    opt = torch.optim.AdamW([*a.values(), *b.values()], lr=recipe.lr, weight_decay=recipe.weight_decay)
    w_reader = recipe.lora.scale / bank.lora.scale
    k = recipe.top_k + 1
    order = list(range(len(items)))
    rng = random.Random(recipe.seed)
    steps = math.ceil(len(items) / recipe.batch_size)
    bar = tqdm(total=recipe.epochs * steps, desc="reader", unit="step", disable=not progress)
    losses = []
    for _ in range(recipe.epochs):
        rng.shuffle(order)
        for s in range(steps):
            rows = order[s * recipe.batch_size:(s + 1) * recipe.batch_size]
            n_tok = sum(len(data[r][1]) for r in rows)
            xs, ts, idx, sc, ws = [], [], [], [], []
            for r in rows:
                x, t = data[r]
                slot_i = torch.full((k,), -1, dtype=torch.long)
                slot_w = torch.zeros(k)
                for j, (e, w) in enumerate(items[r][1]):
                    slot_i[j], slot_w[j] = pos[e], w * bank.lora.scale
                slot_i[-1], slot_w[-1] = len(union), w_reader * bank.lora.scale
                xs.append(x), ts.append(t), ws.append(torch.full((len(t),), 1.0 / n_tok))
                idx.append(slot_i.expand(len(t), k)), sc.append(slot_w.expand(len(t), k))
            mine = ExpertSet({n: a[n][None] for n in site.names}, {n: b[n][None] for n in site.names}).pad_rank(rank)
            experts = ExpertSet({n: torch.cat([frozen.a[n], mine.a[n]]) for n in site.names},
                                {n: torch.cat([frozen.b[n], mine.b[n]]) for n in site.names})
            active = ActiveExperts(experts, torch.cat(idx).to(dev), torch.cat(sc).to(dev))
            with use_experts(active):
                hidden = site.hidden(torch.cat(xs))
            total, _ = chunked_loss(hidden, head.weight, getattr(head, "bias", None), torch.cat(ts),
                                    torch.cat(ws).to(dev))
            opt.zero_grad()
            total.backward()
            opt.step()
            losses.append(total.item())
            bar.update(1)
    bar.close()
    tensors = {**{f"{n}.lora_a": a[n].detach().cpu().clone() for n in site.names},
               **{f"{n}.lora_b": b[n].detach().cpu().clone() for n in site.names}}
    info = {"reader_recipe": asdict(recipe), "questions": len(items),
            "documents": len({q["doc_id"] for q in questions}), "experts_seen": len(union),
            "last_epoch_loss": sum(losses[-steps:]) / steps, "seconds": round(time.perf_counter() - t0, 1)}
    return Reader(tensors, recipe.lora, bank.fingerprint, bank.recipe, name, info)
