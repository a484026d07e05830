"""The DMoE paper's ablations (App. A), each one function over the evaluation :class:`Harness`, returning
``{row name: [Sample, ...]}`` for :func:`doe_ext.dmoe.evaluate.summarize` (one row group of the report).

Routing and triggering (the main bank, no training): Table 5 (accuracy by token-uncertainty bin),
Table 6 (random trigger, random router, always trigger, oracle router), Fig. 5 (top-k), Fig. 6 (trigger
threshold), Table 7 (BM25 vs a dense retriever from the base model's mean-pooled hidden states) and
Table 9 (bank fractions), and the composition of the k experts (sum, mean, score, top1). Retraining (a
bank of the given questions' documents per arm, so every arm of the table is trained and routed the
same way): Table 3 (experts in the last layer vs the last 25% / 50% of the layers,
:mod:`doe_ext.dmoe.deep`), Table 8 (rank / alpha) and the training objective (the paper's recipe vs
context distillation).
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from doe_ext.dmoe.augment import Augmentation, Document
from doe_ext.dmoe.bank import ExpertBank
from doe_ext.dmoe.build import build_bank, commit
from doe_ext.dmoe.deep import train_deep
from doe_ext.dmoe.evaluate import Harness, Sample, Variant, evaluate
from doe_ext.dmoe.experts import ExpertSite, LoRAConfig
from doe_ext.dmoe.metrics import bootstrap_ci
from doe_ext.dmoe.model import DMoE
from doe_ext.dmoe.recipe import Recipe
from doe_ext.dmoe.routing import COMPOSITIONS, Router


def _dmoe(h: Harness, bank: ExpertBank | None = None, **kw) -> DMoE:
    d = h.dmoe
    args = dict(tau=d.tau, top_k=h.top_k, query_tokens=h.query_tokens, compose=d.compose, temperature=d.temperature)
    return DMoE(h.base, bank or h.bank, **{**args, **kw})


def random_trigger(rate: float, seed: int = 0) -> Callable[[Tensor, int], Tensor]:
    """Fires at each step of each sequence with probability ``rate`` (seeded), whatever the entropy."""
    g = torch.Generator().manual_seed(seed)
    return lambda ent, step: torch.rand(ent.shape[0], generator=g) < rate


def random_router(ids: list[str], seed: int = 0) -> Router:
    """``k`` experts drawn uniformly (seeded) from ``ids``, whatever the query (score 1 each)."""
    rng = random.Random(seed)
    return lambda query, k: [(i, 1.0) for i in rng.sample(ids, min(k, len(ids)))]


def trigger_rate(samples: list[Sample]) -> float:
    """Triggers per generated step (an answer's steps approximated by its tokens, at least 1)."""
    steps = sum(max(1, s.steps) for s in samples)
    return sum(s.triggers for s in samples) / max(steps, 1)


def table6(h: Harness, questions: list[dict], full: list[Sample], seed: int = 0, progress: bool = True):
    """Trigger vs router (Table 6): the full DMoE's samples ``full`` against a random trigger at the
    same rate, a random router behind the TU trigger, a trigger at every step, and the oracle router
    (each question's own document) behind the TU trigger."""
    rate = trigger_rate(full)
    variants = [Variant("random trigger", _dmoe(h, trigger=random_trigger(rate, seed))),
                Variant("random router", _dmoe(h, router=random_router(h.bank.ids(), seed))),
                Variant("always trigger", _dmoe(h, tau=-1.0)),
                Variant("oracle router", _dmoe(h, top_k=1), oracle=True)]
    return {"TU + BM25 (DMoE)": full, **evaluate(h, questions, variants, progress=progress)}


def fig5_top_k(h: Harness, questions: list[dict], ks=(1, 2, 3, 4, 5), progress: bool = True):
    """Experts per trigger (Fig. 5)."""
    return evaluate(h, questions, [Variant(f"top-{k}", _dmoe(h, top_k=k)) for k in ks], progress=progress)


def fig6_threshold(h: Harness, questions: list[dict], taus=(0.5, 1.0, 2.0, 3.0, 4.0), progress: bool = True):
    """The trigger threshold (Fig. 6): EM, triggers and latency per tau."""
    return evaluate(h, questions, [Variant(f"tau={t:g}", _dmoe(h, tau=t)) for t in taus], progress=progress)


def compositions(h: Harness, questions: list[dict], modes=COMPOSITIONS, temperatures=(1.0, 3.0), oracle: bool = True,
                 progress: bool = True):
    """How the top-k experts combine (sum: eq. 6; mean; score, at each temperature; top1), behind the TU
    trigger and BM25; with ``oracle`` the oracle router (the question's own expert alone) beside them."""
    variants = []
    for m in modes:
        for t in (temperatures if m == "score" else (1.0,)):
            name = f"score (T={t:g})" if m == "score" else m
            variants.append(Variant(name, _dmoe(h, compose=m, temperature=t)))
    if oracle:
        variants.append(Variant("oracle router", _dmoe(h, top_k=1), oracle=True))
    return evaluate(h, questions, variants, progress=progress)


class DenseRouter:
    """Table 7's dense retriever: cosine similarity of the base model's mean-pooled last hidden states
    (an SGPT-style embedding from the same frozen model) between the query and each expert's surrogate."""

    def __init__(self, h: Harness, batch_size: int = 16):
        self.base, self.ids = h.base, h.bank.ids()
        rows = {r.id: r.surrogate for r in h.bank.rows()}
        self.emb = torch.cat([self.embed([rows[i] for i in self.ids[s:s + batch_size]])
                              for s in range(0, len(self.ids), batch_size)])

    @torch.no_grad()
    def embed(self, texts: list[str]) -> Tensor:
        tok = self.base.tokenizer
        side, tok.padding_side = tok.padding_side, "right"
        try:
            enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=256,
                      add_special_tokens=False).to(self.base.device)
        finally:
            tok.padding_side = side
        hidden = self.base.model.base_model(**enc).last_hidden_state.float()
        m = enc["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1).cpu()

    def __call__(self, query: str, k: int) -> list[tuple[str, float]]:
        top = (self.emb @ self.embed([query])[0]).topk(min(k, len(self.ids)))
        return [(self.ids[i], float(v)) for v, i in zip(top.values.tolist(), top.indices.tolist())]


def table7_retriever(h: Harness, questions: list[dict], full: list[Sample], progress: bool = True):
    """BM25 (the full DMoE's samples) vs the dense retriever as DMoE's router (Table 7)."""
    dense = DenseRouter(h)
    return {"BM25": full, **evaluate(h, questions, [Variant("dense (mean-pooled base states)", _dmoe(h, router=dense))],
                                     progress=progress)}


def subset_router(h: Harness, keep: list[str]) -> Router:
    """The bank's BM25 restricted to ``keep`` (best ``k`` among them)."""
    kept = set(keep)

    def route(query: str, k: int) -> list[tuple[str, float]]:
        return [(i, s) for i, s in h.bank.search(query, len(h.bank)) if i in kept][:k]
    return route


def table9_fractions(h: Harness, questions: list[dict], full: list[Sample], fractions=(0.1, 0.2, 0.5), seed: int = 0,
                     progress: bool = True):
    """The bank cut to a seeded fraction of its experts (Table 9); the full bank is the DMoE row.
    A question whose document was cut can only be answered without it."""
    ids = h.bank.ids()
    order = random.Random(seed).sample(ids, len(ids))
    variants = [Variant(f"{f:g} of the bank", _dmoe(h, router=subset_router(h, order[:max(1, round(f * len(ids)))])))
                for f in fractions]
    return {**evaluate(h, questions, variants, progress=progress), "full bank": full}


def table5_bins(samples: list[Sample], bins: int = 5) -> list[dict]:
    """Questions in ``bins`` equal-count bins of the base model's token uncertainty (TU of the first
    answer token, before any expert), lowest first: per bin its TU range, n, EM and F1 with intervals."""
    have = sorted((s for s in samples if s.entropy is not None), key=lambda s: s.entropy)
    out = []
    for part in np.array_split(np.arange(len(have)), bins):
        group = [have[i] for i in part]
        if group:
            out.append({"tu_low": group[0].entropy, "tu_high": group[-1].entropy, "n": len(group),
                        "em": bootstrap_ci([s.em for s in group]), "f1": bootstrap_ci([s.f1 for s in group])})
    return out


def _docs(h: Harness, questions: list[dict]) -> list[Document]:
    ids = list(dict.fromkeys(q["doc_id"] for q in questions))
    return [Document(i, h.bank.row(i).text) for i in ids]


def _subset_bank(h: Harness, path: Path, docs: list[Document], recipe: Recipe, progress: bool) -> Harness:
    """A harness over a bank of ``docs`` trained with ``recipe``, kept at ``path``."""
    bank = ExpertBank(path, create=True, fingerprint=h.base.fingerprint, base_name=h.bank.base_name, recipe=recipe)
    build_bank(h.base, docs, bank, progress=progress)
    return Harness(h.base, bank, shots=h.shots, top_k=h.top_k, tau=h.dmoe.tau, max_new_tokens=h.max_new_tokens,
                   query_tokens=h.query_tokens, batch_size=h.batch_size, compose=h.dmoe.compose,
                   temperature=h.dmoe.temperature)


def table8_rank_alpha(h: Harness, questions: list[dict], recipe: Recipe, path: Path,
                      configs=((2, 8.0), (4, 16.0), (8, 32.0), (16, 64.0)), progress: bool = True):
    """LoRA rank / alpha (Table 8), alpha / rank = 4 as the paper's 4 / 16: per arm a bank of the
    questions' documents trained with ``recipe`` at that shape, then DMoE (TU + BM25 over it)."""
    docs, out = _docs(h, questions), {}
    for r, a in configs:
        hh = _subset_bank(h, Path(path) / f"r{r}-a{a:g}", docs, recipe.replace(lora=LoRAConfig(r, a)), progress)
        out.update(evaluate(hh, questions, [Variant(f"rank {r} / alpha {a:g}", hh.dmoe)], progress=progress))
    return out


def objectives(h: Harness, questions: list[dict], recipes: dict[str, Recipe], path: Path, progress: bool = True):
    """The training recipe (the paper's next-token recipe vs context distillation, say): per named
    recipe a bank of the questions' documents, then DMoE (TU + BM25 over it) and the oracle router."""
    docs, out = _docs(h, questions), {}
    for name, recipe in recipes.items():
        tag = hashlib.sha256(recipe.to_json().encode()).hexdigest()[:10]
        hh = _subset_bank(h, Path(path) / f"recipe-{tag}", docs, recipe, progress)
        out.update(evaluate(hh, questions, [Variant(f"{name}: DMoE", hh.dmoe),
                                            Variant(f"{name}: oracle router", _dmoe(hh, hh.bank, top_k=1),
                                                    oracle=True)], progress=progress))
    return out


def table3_layers(h: Harness, questions: list[dict], recipe: Recipe, path: Path, fractions=(0.25, 0.5),
                  group_size: int = 16, progress: bool = True):
    """Experts in the last layer (re-prediction, KV cache kept) vs in the last ``fractions`` of the
    layers (a trigger rebuilds the rows' KV cache), on banks of the questions' documents trained with
    the next-token version of ``recipe`` on the passages alone (deep experts train on the whole model,
    without a teacher or augmentation).
    Returns (rows, cost): per arm the recomputed tokens per answer and the share of layers whose KV a
    trigger makes stale."""
    recipe = recipe.next_token(augment="none")
    docs = _docs(h, questions)
    hh = _subset_bank(h, Path(path) / f"r{recipe.lora.rank}-a{recipe.lora.alpha:g}-next_token", docs, recipe,
                      progress)
    rows = evaluate(hh, questions, [Variant("last layer", hh.dmoe)], progress=progress)
    cost = {"last layer": {"recomputed_tokens_per_answer": 0.0, "stale_layer_share": 0.0}}
    for f in fractions:
        site = ExpertSite(h.base.model, depth=f)
        bank = ExpertBank(Path(path) / f"deep-{f:g}", create=True, fingerprint=h.base.fingerprint,
                          base_name=h.bank.base_name, recipe=recipe)
        todo = [d for d in docs if d.id not in bank]
        for s in range(0, len(todo), group_size):
            group = todo[s:s + group_size]
            for d, e in zip(group, train_deep(h.base, site, [(d, Augmentation()) for d in group], recipe)):
                commit(bank, d, Augmentation(), e)
        name = f"last {f:.0%} of layers ({len(site.layer_ids)})"
        dm = _dmoe(hh, bank, site=site)
        rows.update(evaluate(hh, questions, [Variant(name, dm)], progress=progress))
        cost[name] = {"recomputed_tokens_per_answer": dm.recomputed_tokens / max(len(questions), 1),
                      "stale_layer_share": site.stale_layer_share}
        site.detach()
        bank.close()
    return rows, cost
