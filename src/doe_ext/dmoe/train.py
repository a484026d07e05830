"""Batched expert training (DMoE §4.1.3), for both objectives of a :class:`Recipe`.

The base is frozen and experts sit after the last attention, so the residual stream entering the last
MLP block does not depend on the expert. It is computed once per training instance (one forward of
the base body, no head) and kept for the positions where the loss is taken; then many experts train
in one batch: every row goes through its own expert (``multi_lora_linear``), the vocabulary
projection runs only on those rows and in chunks (:class:`_ChunkedLoss`, never a ``[tokens, vocab]``
float32 tensor for a whole batch), and each expert has its own AdamW state and step count, updated
only at steps where it had data. Expert ``e``'s step ``s`` always sees the same instances, so experts
trained together equal experts trained one at a time.

The objectives differ only in each loss row's target. ``"next_token"``, and ``"distill"`` with
``distill_loss="sequence"``: the next token (cross-entropy; for distillation the teacher's own answer).
``"distill"`` with ``distill_loss="kl"``: the teacher's final hidden state at the same target token, computed once per instance
from the base with the document in its prompt (:mod:`doe_ext.dmoe.distill`); the loss is
``KL(teacher || student)`` of the two next-token distributions, plus ``hidden_weight`` times the L1
distance of the final hidden states relative to the teacher's.
"""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache

from doe_ext import threads
from doe_ext.dmoe.augment import Augmentation, Document
from doe_ext.dmoe.distill import instances_for
from doe_ext.dmoe.base import BaseLM
from doe_ext.dmoe.cache import common_prefix
from doe_ext.dmoe.experts import ActiveExperts, ExpertSet, use_experts
from doe_ext.dmoe.instances import Instance
from doe_ext.dmoe.recipe import SFT_DOCS_PER_STEP, Recipe


@dataclass
class TrainedExpert:
    id: str
    tensors: dict[str, Tensor]  # "<proj>.lora_a" [r, in], "<proj>.lora_b" [out, r]
    loss: float  # mean loss over the last epoch's steps


def _prefix_groups(instances: list[Instance], min_shared: int) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Instances that start with the same ``>= min_shared`` tokens (PRAG's QA instances repeat the
    instruction and the passage): ``(prefix length, members)`` groups, and the rest."""
    order = sorted(range(len(instances)), key=lambda i: instances[i].ids)
    groups, rest, i = [], [], 0
    while i < len(order):
        first = instances[order[i]].ids
        members, shared = [order[i]], len(first) - 1
        j = i + 1
        while j < len(order):
            ids = instances[order[j]].ids
            p = min(common_prefix(first, ids), len(ids) - 1, shared)
            if p < min_shared:
                break
            members.append(order[j])
            shared = p
            j += 1
        if len(members) > 1:
            groups.append((shared, members))
        else:
            rest.append(order[i])
        i = j
    return groups, rest


@torch.no_grad()
def residuals(base: BaseLM, instances: list[Instance], max_batch_tokens: int = 8192,
              min_shared: int = 16) -> list[tuple[Tensor, Tensor]]:
    """Per instance: the residual entering the last MLP block at its loss positions ``[L, d]`` and the
    targets ``[L]``, from the base body (no LM head). Instances sharing a prefix of ``min_shared`` tokens
    or more run it once (a KV cache repeated over the group, then the suffixes); the others run in
    right-padded batches of similar length. Every batch holds at most ``max_batch_tokens`` padded tokens
    (a large group's suffixes in several). Causal attention keeps the padding invisible to the real
    positions."""
    body, pad = base.model.base_model, base.tokenizer.pad_token_id
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(instances)

    dev = base.device

    def keep(i: int, row: Tensor) -> None:
        inst = instances[i]
        pos = torch.arange(inst.loss_start, len(inst.ids) - 1, device=dev)
        out[i] = (row[pos].clone(), torch.tensor(inst.ids, device=dev)[pos + 1])

    def run(batch: list[list[int]], prefix: int = 0, cache=None) -> Tensor:
        n = max(map(len, batch))
        ids = torch.tensor([b + [pad] * (n - len(b)) for b in batch], device=dev)
        mask = torch.tensor([[1] * (prefix + len(b)) + [0] * (n - len(b)) for b in batch], device=dev)
        pos = torch.arange(prefix, prefix + n, device=dev).expand(len(batch), n)
        with base.site.capture() as cap:
            body(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=cache is not None)
        return cap.value

    def batches(rows: list[int], length) -> list[list[int]]:
        """``rows`` sorted by ``length``, cut into batches of at most ``max_batch_tokens`` padded tokens."""
        rows, out_, start = sorted(rows, key=length), [], 0
        while start < len(rows):
            end = start + 1
            while end < len(rows) and (end - start + 1) * length(rows[end]) <= max_batch_tokens:
                end += 1
            out_.append(rows[start:end])
            start = end
        return out_

    groups, rest = _prefix_groups(instances, min_shared)
    for shared, members in groups:
        prefix = DynamicCache(config=base.model.config)
        head = run([instances[members[0]].ids[:shared]], cache=prefix)[0]  # [shared, d]
        for batch in batches(members, lambda i: len(instances[i].ids)):
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(batch))
            tails = run([instances[i].ids[shared:] for i in batch], prefix=shared, cache=cache)
            for i, tail in zip(batch, tails):
                keep(i, torch.cat([head, tail[:len(instances[i].ids) - shared]]))
    for batch in batches(rest, lambda i: len(instances[i].ids)):
        for i, row in zip(batch, run([instances[i].ids for i in batch])):
            keep(i, row)
    return out




class _ChunkedLoss(torch.autograd.Function):
    """``sum_t w_t * loss_t`` of the logits ``hidden_t @ W.T + b`` with the vocabulary projection in
    chunks of rows; the frozen head gets no gradient. ``target`` is either next-token ids ``[N]``
    (cross-entropy) or the teacher's final hidden states ``[N, d]`` (``KL(teacher || student)``, the
    teacher's logits through the same head). The gradient w.r.t. ``hidden`` is formed chunk by chunk
    in the forward, so no ``[rows, vocab]`` tensor outlives a chunk. Returns (total, per-row losses)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, w, chunk):
        grad = torch.empty_like(hidden)
        per_row = hidden.new_empty(hidden.shape[0])
        up = torch.promote_types(hidden.dtype, torch.float32)  # bf16 -> f32, f64 stays
        for s in range(0, hidden.shape[0], chunk):
            logp = torch.log_softmax(F.linear(hidden[s:s + chunk], weight, bias).to(up), -1)
            t = target[s:s + chunk]
            if t.dim() == 1:  # next-token ids
                per_row[s:s + chunk] = -logp.gather(1, t[:, None])[:, 0]
                p = logp.exp()
                p[torch.arange(len(t), device=p.device), t] -= 1
            else:  # teacher hidden states
                logq = torch.log_softmax(F.linear(t, weight, bias).to(up), -1)
                q = logq.exp()
                per_row[s:s + chunk] = (q * (logq - logp)).sum(-1)
                p = logp.exp() - q
            grad[s:s + chunk] = ((p * w[s:s + chunk, None]).to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(per_row)
        return (per_row * w).sum(), per_row

    @staticmethod
    def backward(ctx, grad_total, _grad_rows):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None, None, None


def chunked_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, w: Tensor,
                 chunk: int = 256) -> tuple[Tensor, Tensor]:
    """See :class:`_ChunkedLoss`."""
    return _ChunkedLoss.apply(hidden, weight, bias, target, w, chunk)


def hidden_l1(hidden: Tensor, teacher: Tensor) -> Tensor:
    """Per row, ``|h - h_teacher|_1 / |h_teacher|_1`` (deep context distillation's hidden-state term,
    on the final hidden state: what a last-layer expert controls)."""
    return (hidden - teacher).abs().sum(-1) / teacher.abs().sum(-1).clamp(min=1e-6)


def expert_seed(seed: int, expert_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{expert_id}".encode()).digest()[:8], "little") & (2 ** 63 - 1)


class _ExpertAdamW:
    """AdamW over stacked expert tensors ``[E, ...]`` with one step count per expert: ``step(rows)``
    updates only those experts, exactly as ``torch.optim.AdamW`` would update each one alone."""

    def __init__(self, params: list[Tensor], lr: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.wd, self.betas, self.eps = params, lr, weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = torch.zeros(params[0].shape[0], dtype=torch.float64)

    @torch.no_grad()
    def step(self, rows: Tensor) -> None:
        b1, b2 = self.betas
        self.t[rows] += 1
        t = self.t[rows]
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        for p, m, v in zip(self.params, self.m, self.v):
            shape = (-1,) + (1,) * (p.dim() - 1)
            g = p.grad[rows]
            pr = p[rows] * (1 - self.lr * self.wd)
            mr = m[rows].lerp_(g, 1 - b1)
            vr = v[rows].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (vr.sqrt() / bc2.sqrt().to(p.device, p.dtype).view(shape)).add_(self.eps)
            pr -= (self.lr / bc1).to(p.device, p.dtype).view(shape) * mr / denom
            p[rows], m[rows], v[rows] = pr, mr, vr
            p.grad = None


@dataclass
class Companions:
    """Frozen experts active beside each expert while it trains (composed training): ``experts`` stacks
    them; expert ``e`` trains with weight ``own[e]`` beside ``sets[e]``, ``[(index into experts,
    weight), ...]``, as the inference composition would weigh them (each weight times LoRA's scale)."""

    experts: ExpertSet
    sets: list[list[tuple[int, float]]]
    own: list[float]


def train_experts(base: BaseLM, items: list[tuple[Document, Augmentation]], recipe: Recipe = Recipe(),
                  on_epoch: Callable[[int, list[TrainedExpert]], None] | None = None,
                  instances: list[list[Instance]] | None = None, head_chunk: int = 256,
                  on_step: Callable[[int, int], None] | None = None,
                  companions: Companions | None = None) -> list[TrainedExpert]:
    """Train one expert per ``(document, augmentation)``, all in one batch, on the base's last MLP.
    ``on_epoch(epoch, experts)`` sees the experts after each epoch (the learning rate is constant, so
    they are the experts a run of that many epochs gives: one run gives a whole epochs curve).
    ``instances``: each document's, when already made (:func:`doe_ext.dmoe.build.instances` caches them).
    ``on_step(done, total)`` is called after each optimizer step (a progress bar's hook).
    ``companions``: train each expert composed with frozen others (:class:`Companions`); alone by default."""
    insts = instances_for(base, items, recipe) if instances is None else instances
    for (d, _), i in zip(items, insts):
        if not i:
            raise ValueError(f"train_experts: document {d.id!r} gives no training tokens (empty text?)")
    if companions is not None and len(companions.sets) != len(items):
        raise ValueError(f"train_experts: `companions` has sets for {len(companions.sets)} experts, not {len(items)}")
    return _train(base, [d.id for d, _ in items], insts, recipe, on_epoch, head_chunk, on_step=on_step,
                  companions=companions)


def train_adapter(base: BaseLM, items: list[tuple[Document, Augmentation]], recipe: Recipe = Recipe(),
                  adapter_id: str = "sft", docs_per_step: int = SFT_DOCS_PER_STEP,
                  instances: list[list[Instance]] | None = None, head_chunk: int = 256,
                  progress: bool = False) -> TrainedExpert:
    """One LoRA on every document's instances (SFT-LoRA, the DMoE paper's baseline): the same recipe
    and placement as an expert, on the whole corpus, ``recipe.batch_size * docs_per_step`` instances
    per step in document order. ``instances`` as for :func:`train_experts`; ``progress`` shows a bar
    over its optimizer steps (the adapter alone can train for minutes)."""
    if docs_per_step < 1:
        raise ValueError(f"train_adapter: `docs_per_step` must be >= 1, got {docs_per_step}")
    insts = [i for doc in (instances_for(base, items, recipe) if instances is None else instances) for i in doc]
    if not insts:
        raise ValueError("train_adapter: the documents give no training tokens")
    per_step = recipe.replace(batch_size=recipe.batch_size * docs_per_step)
    return _train(base, [adapter_id], [insts], per_step, head_chunk=head_chunk, progress=progress)[0]


def training_data(base: BaseLM, insts: list[list[Instance]], soft: bool = True) -> list[list[tuple[Tensor, Tensor]]]:
    """Per expert, per instance: the residual entering the last MLP block at its loss positions ``[L, d]``
    and the targets: next-token ids ``[L]``, or with ``soft`` for a distillation instance the teacher's
    final hidden states ``[L, d]`` (the base without experts, with the document in its prompt)."""
    flat = [i for doc in insts for i in doc]
    student = iter(residuals(base, flat))  # one body pass for the whole group
    site, out = base.site, []
    for doc in insts:
        teachers = [Instance(i.teacher, i.teacher_start) for i in doc if soft and i.teacher is not None]
        # a document's teacher sequences share their demonstrations and the document: one group each
        got = iter(residuals(base, teachers)) if teachers else None
        with torch.no_grad():
            out.append([(x, site.hidden(next(got)[0]) if soft and i.teacher is not None else t)
                        for i, (x, t) in zip(doc, student)])
    return out


def fresh_experts(site, ids: list[str], recipe: Recipe, device) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Stacked trainable factors ``a [E, r, in]``, ``b [E, out, r]`` per site key, each expert initialised
    from its own seed (drawn on the CPU: the same on every device) in the model's dtype."""
    inits = [site.init_expert(recipe.lora, torch.Generator().manual_seed(expert_seed(recipe.seed, eid))) for eid in ids]
    dt = site.head.weight.dtype
    return tuple({n: torch.stack([e[f"{n}.lora_{x}"] for e in inits]).to(device, dt).requires_grad_()
                  for n in site.names} for x in "ab")


# One training step's rows: the model's hidden states at the loss rows [R, d] (the experts active), their
# targets ([R] next-token ids or [R, d] teacher hidden states), the expert of each row [R] and each row's
# weight [R] (1 / the expert's loss rows in the step).
Batch = Callable[[int, list[int], ExpertSet], tuple[Tensor, Tensor, Tensor, Tensor]]


def fit_experts(site, ids: list[str], recipe: Recipe, steps: list[int], batch: Batch, device,
                on_epoch: Callable[[int, list[TrainedExpert]], None] | None = None, head_chunk: int = 256,
                progress: bool = False, on_step: Callable[[int, int], None] | None = None) -> list[TrainedExpert]:
    """The expert training loop, whatever the site: expert ``ids[e]`` takes part in the first ``steps[e]``
    steps of each of ``recipe.epochs`` epochs; ``batch(step, active, experts)`` runs the model on that
    step's instances of the active experts (each row through its own expert) and returns its rows
    (:data:`Batch`). The head's loss runs in chunks; each expert has its own AdamW state. ``on_epoch``,
    ``progress`` and ``on_step`` as for :func:`train_experts`."""
    a, b = fresh_experts(site, ids, recipe, device)
    opt = _ExpertAdamW([*a.values(), *b.values()], recipe.lr, recipe.weight_decay)
    experts, head, E = ExpertSet(a=a, b=b), site.head, len(ids)
    loss_sum, loss_n = torch.zeros(E, dtype=torch.float64), torch.zeros(E)
    bar = tqdm(total=recipe.epochs * max(steps), desc="train " + ids[0] if E == 1 else "train",
               unit="step", disable=not progress)
    for epoch in range(recipe.epochs):
        loss_sum.zero_()  # the loss reported is the epoch's
        loss_n.zero_()
        for s in range(max(steps)):
            threads.rebalance()  # cores back to a command started beside this one (a no-op unless claimed)
            active = [e for e in range(E) if s < steps[e]]
            hidden, t, i, w = batch(s, active, experts)
            total, per_row = chunked_loss(hidden, head.weight, getattr(head, "bias", None), t, w, head_chunk)
            if recipe.hidden_weight and t.dim() == 2:
                extra = recipe.hidden_weight * hidden_l1(hidden, t)
                total = total + (extra * w).sum()
                per_row = per_row + extra.detach()
            total.backward()
            opt.step(torch.tensor(active))
            step_loss = torch.zeros(E, dtype=torch.float64).index_add_(0, i.cpu(), (per_row * w).double().cpu())
            loss_sum[active] += step_loss[active]
            loss_n[active] += 1
            bar.update(1)
            if on_step is not None:
                on_step(epoch * max(steps) + s + 1, recipe.epochs * max(steps))
        if on_epoch is not None and epoch < recipe.epochs - 1:
            on_epoch(epoch + 1, _experts(ids, site.names, a, b, loss_sum / loss_n))
    bar.close()
    out = _experts(ids, site.names, a, b, loss_sum / loss_n)
    if on_epoch is not None:
        on_epoch(recipe.epochs, out)
    return out


def _train(base: BaseLM, ids: list[str], insts: list[list[Instance]], recipe: Recipe,
           on_epoch: Callable[[int, list[TrainedExpert]], None] | None = None,
           head_chunk: int = 256, progress: bool = False,
           on_step: Callable[[int, int], None] | None = None,
           companions: Companions | None = None) -> list[TrainedExpert]:
    """Expert ``ids[e]`` trained on ``insts[e]`` at the base's last MLP, all experts in one batch, on the
    residuals cached once per instance (see the module docstring); with ``companions``, each beside its
    frozen companions."""
    site = base.site.attach()
    data = training_data(base, insts, soft=recipe.distill_loss == "kl")
    dev, bs = base.device, recipe.batch_size
    slots = None
    if companions is not None:  # per expert: its own slot, then its companions' (after the E trained ones)
        k = 1 + max(map(len, companions.sets))
        slots = torch.full((len(ids), k), -1, dtype=torch.long)
        weights = torch.zeros(len(ids), k)
        for e, (own, others) in enumerate(zip(companions.own, companions.sets)):
            slots[e, 0], weights[e, 0] = e, own
            for j, (c, w) in enumerate(others, 1):
                slots[e, j], weights[e, j] = len(ids) + c, w
        slots, weights, frozen = slots.to(dev), (weights * recipe.lora.scale).to(dev), companions.experts.to(dev)

    def batch(s: int, active: list[int], experts: ExpertSet):
        xs, ts, idx, ws = [], [], [], []
        for e in active:
            rows = data[e][s * bs:(s + 1) * bs]
            n_tok = sum(len(t) for _, t in rows)
            for x, t in rows:
                xs.append(x), ts.append(t)
                idx.append(torch.full((len(t),), e)), ws.append(torch.full((len(t),), 1.0 / n_tok))
        x, t, i, w = torch.cat(xs), torch.cat(ts), torch.cat(idx).to(dev), torch.cat(ws).to(dev)
        if slots is None:
            active_ = ActiveExperts.per_row(experts, i, recipe.lora.scale)
        else:
            union = ExpertSet({n: torch.cat([experts.a[n], frozen.a[n]]) for n in experts.a},
                              {n: torch.cat([experts.b[n], frozen.b[n]]) for n in experts.b})
            active_ = ActiveExperts(union, slots[i], weights[i])
        with use_experts(active_):
            return site.hidden(x), t, i, w

    return fit_experts(site, ids, recipe, [math.ceil(len(d) / bs) for d in data], batch, dev, on_epoch,
                       head_chunk, progress, on_step)


def _experts(ids, names, a, b, loss) -> list[TrainedExpert]:
    return [TrainedExpert(id=eid, tensors={**{f"{n}.lora_a": a[n][k].detach().cpu().clone() for n in names},
                                           **{f"{n}.lora_b": b[n][k].detach().cpu().clone() for n in names}},
                          loss=float(loss[k]))
            for k, eid in enumerate(ids)]
