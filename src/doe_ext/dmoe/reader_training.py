"""Training the knowledge reader (:mod:`doe_ext.dmoe.reader`): on a bank of train-split documents and
questions about them, per question the experts routed as at inference (the gold expert and BM25's best
distractors, composed by the default composition), the prompt closed-book or, for a ``with_document``
share, with the retrieved documents too; the loss is the answer's next-token cross-entropy with base
and experts frozen. Inference never imports this module."""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict

import torch

from doe_ext.dmoe.reader import Reader, ReaderError, ReaderRecipe


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
    from doe_ext.dmoe.instances import Instance, continues, starts

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
