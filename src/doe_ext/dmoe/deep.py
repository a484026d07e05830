"""Table 3's variant, training side: experts on the MLPs of the last 25% / 50% of the layers
(``ExpertSite(model, depth=0.25)``) instead of the last one. Generation is :class:`doe_ext.dmoe.DMoE`
with that site: a trigger runs the triggered rows again from their first token (their KV cache is
stale from the first expert layer on), which is the cost the paper's last-layer design avoids.

Training runs the whole model (no cached residual: the experts' layers depend on each other), all
experts of a group in one padded batch through ``multi_lora_linear``, in the one expert training loop
(:func:`doe_ext.dmoe.train.fit_experts`), so its recipe means the same. Next-token targets only: the
next_token objective, or sequence-level distillation.
"""
from __future__ import annotations

import math

import torch

from doe_ext.dmoe.augment import Augmentation, Document
from doe_ext.dmoe.base import BaseLM
from doe_ext.dmoe.distill import instances_for
from doe_ext.dmoe.experts import ActiveExperts, ExpertSet, ExpertSite, use_experts
from doe_ext.dmoe.instances import Instance
from doe_ext.dmoe.recipe import Recipe
from doe_ext.dmoe.train import TrainedExpert, fit_experts


def train_deep(base: BaseLM, site: ExpertSite, items: list[tuple[Document, Augmentation]], recipe: Recipe,
               head_chunk: int = 256, instances: list[list[Instance]] | None = None) -> list[TrainedExpert]:
    """One expert per document over ``site``'s layers (the recipe's instances, as
    :func:`doe_ext.dmoe.train.train_experts` makes them, or ``instances``), all in one batch per step.
    Next-token targets only: the ``next_token`` objective, or distillation with ``distill_loss="sequence"``
    (the teacher's answers as targets)."""
    if recipe.objective == "distill" and recipe.distill_loss != "sequence":
        raise ValueError("train_deep: deep experts train on next-token targets (the next_token objective, or "
                         f"distill with distill_loss='sequence'), got distill_loss={recipe.distill_loss!r}")
    dev, pad, bs = base.device, base.tokenizer.pad_token_id, recipe.batch_size
    insts = instances_for(base, items, recipe) if instances is None else instances
    ids = [d.id for d, _ in items]
    site.attach()
    body = base.model.base_model

    def batch(s: int, active: list[int], experts: ExpertSet):
        rows = [(e, inst) for e in active for inst in insts[e][s * bs:(s + 1) * bs]]
        T = max(len(i.ids) for _, i in rows)
        x = torch.tensor([i.ids + [pad] * (T - len(i.ids)) for _, i in rows], device=dev)
        mask = torch.tensor([[1] * len(i.ids) + [0] * (T - len(i.ids)) for _, i in rows], device=dev)
        sel = [(r, p) for r, (_, i) in enumerate(rows) for p in range(i.loss_start, len(i.ids) - 1)]
        r_idx = torch.tensor([r for r, _ in sel], device=dev)
        p_idx = torch.tensor([p for _, p in sel], device=dev)
        who = torch.tensor([rows[r][0] for r, _ in sel])  # the expert of each loss row
        n_tok = torch.zeros(len(ids)).index_add_(0, who, torch.ones(len(sel)))
        per_seq = ActiveExperts.per_row(experts, torch.tensor([e for e, _ in rows], device=dev), recipe.lora.scale)
        with use_experts(per_seq):
            hidden = body(input_ids=x, attention_mask=mask).last_hidden_state
        return hidden[r_idx, p_idx], x[r_idx, p_idx + 1], who, (1.0 / n_tok[who]).to(dev)

    return fit_experts(site, ids, recipe, [math.ceil(len(d) / bs) for d in insts], batch, dev, head_chunk=head_chunk)
