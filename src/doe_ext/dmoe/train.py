"""Batched expert training (DMoE §4.1.3 with PRAG's recipe, far cheaper than PRAG's loop).

The base is frozen and experts sit after the last attention, so the residual stream entering the last
MLP block does not depend on the expert. It is computed once per training instance (one forward of
the base body, no head) and kept for the positions where the loss is taken; then many experts train
in one batch: every row goes through its own expert (``multi_lora_linear``), the vocabulary
projection runs only on those rows and in chunks (:class:`_ChunkedLMLoss`, never a ``[tokens, vocab]``
float32 tensor for a whole batch), and each expert has its own AdamW state and step count, updated
only at steps where it had data. Expert ``e``'s step ``s`` always sees the same instances, so experts
trained together equal experts trained one at a time.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import DynamicCache

from doe_ext.dmoe.augment import Augmentation, qa_prompt
from doe_ext.dmoe.base import BaseLM, capture_residual
from doe_ext.dmoe.experts import ExpertSet, LoRAConfig, Routing, attach, init_expert, use_experts


@dataclass(frozen=True)
class TrainConfig:
    """The expert recipe.

    Args:
        lora: rank and alpha (DMoE: 4 / 16).
        lr: AdamW learning rate (PRAG's code: 3e-4; the DMoE paper states 1e-5).
        epochs: passes over each document's instances (DMoE: 1).
        batch_size: instances per expert per optimizer step (PRAG: 1).
        weight_decay: AdamW's decoupled decay (torch's default, as PRAG uses it).
        max_length: instances are cut to this many tokens.
        seed: with the expert id, seeds the expert's LoRA init.
        head_chunk: rows per chunk of the vocabulary projection.
    """

    lora: LoRAConfig = field(default_factory=LoRAConfig)
    lr: float = 3e-4
    epochs: int = 1
    batch_size: int = 1
    weight_decay: float = 0.01
    max_length: int = 512
    seed: int = 0
    head_chunk: int = 256

    def __post_init__(self):
        for name in ("epochs", "batch_size", "max_length", "head_chunk"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"TrainConfig: `{name}` must be a positive int, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig: `lr` must be > 0, got {self.lr!r}")

    def to_dict(self) -> dict:
        return {"rank": self.lora.rank, "alpha": self.lora.alpha, "lr": self.lr, "epochs": self.epochs,
                "batch_size": self.batch_size, "weight_decay": self.weight_decay, "max_length": self.max_length,
                "seed": self.seed}


@dataclass
class Instance:
    """One training sequence: token ids and the first position whose next token is a target."""

    ids: list[int]
    loss_start: int


@dataclass
class TrainedExpert:
    id: str
    tensors: dict[str, Tensor]  # "<proj>.lora_a" [r, in], "<proj>.lora_b" [out, r]
    loss: float  # mean next-token loss over the last epoch's steps


def training_instances(tokenizer, text: str, aug: Augmentation, max_length: int) -> list[Instance]:
    """PRAG's instances for one document: the passage and its rewrite as plain text (loss on every
    token), then for the first half of the QA pairs the question with the passage and with the
    rewrite in the prompt, for the rest the question alone (loss on the answer)."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = [Instance(enc(t)[:max_length], 0) for t in (text, aug.rewrite) if t]
    half = (len(aug.qa) + 1) // 2
    for j, qa in enumerate(aug.qa):
        contexts = [[p] for p in (text, aug.rewrite) if p] if j < half else [None]
        for ctx in contexts:
            prompt = enc(qa_prompt(tokenizer, qa["question"], ctx))
            ids = (prompt + enc(" " + qa["answer"]) + eos)[:max_length]
            if len(ids) > len(prompt):
                out.append(Instance(ids, len(prompt) - 1))
    return [i for i in out if len(i.ids) - 1 > i.loss_start]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


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
    right-padded batches of similar length (at most ``max_batch_tokens`` padded tokens each). Causal
    attention keeps the padding invisible to the real positions."""
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
        with capture_residual(base.last) as cap:
            body(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=cache is not None)
        return cap.value

    groups, rest = _prefix_groups(instances, min_shared)
    for shared, members in groups:
        cache = DynamicCache(config=base.model.config)
        head = run([instances[members[0]].ids[:shared]], cache=cache)[0]  # [shared, d]
        cache.batch_repeat_interleave(len(members))
        tails = run([instances[i].ids[shared:] for i in members], prefix=shared, cache=cache)
        for i, tail in zip(members, tails):
            keep(i, torch.cat([head, tail[:len(instances[i].ids) - shared]]))
    rest.sort(key=lambda i: len(instances[i].ids))
    start = 0
    while start < len(rest):
        end = start + 1
        while end < len(rest) and (end - start + 1) * len(instances[rest[end]].ids) <= max_batch_tokens:
            end += 1
        for i, row in zip(rest[start:end], run([instances[i].ids for i in rest[start:end]])):
            keep(i, row)
        start = end
    return out


class _ChunkedLMLoss(torch.autograd.Function):
    """``sum_t w_t * CE(hidden_t @ W.T + b, target_t)`` with the vocabulary projection in chunks of rows;
    the frozen head gets no gradient. The gradient w.r.t. ``hidden`` is formed chunk by chunk in the
    forward, so no ``[rows, vocab]`` tensor outlives a chunk. Returns (total, per-row losses)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, w, chunk):
        grad = torch.empty_like(hidden)
        per_row = hidden.new_empty(hidden.shape[0])
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            logits = F.linear(h, weight, bias)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> f32, f64 stays
            lse = torch.logsumexp(logits, -1)
            t = target[s:s + chunk]
            per_row[s:s + chunk] = lse - logits.gather(1, t[:, None])[:, 0]
            p = torch.exp(logits - lse[:, None])
            p[torch.arange(len(t), device=p.device), t] -= 1
            grad[s:s + chunk] = ((p * w[s:s + chunk, None]).to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(per_row)
        return (per_row * w).sum(), per_row

    @staticmethod
    def backward(ctx, grad_total, _grad_rows):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None, None, None


def chunked_lm_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, w: Tensor,
                    chunk: int = 256) -> tuple[Tensor, Tensor]:
    return _ChunkedLMLoss.apply(hidden, weight, bias, target, w, chunk)


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


def train_experts(base: BaseLM, docs: list[tuple[str, str, Augmentation]], cfg: TrainConfig = TrainConfig(),
                  on_epoch: Callable[[int, list[TrainedExpert]], None] | None = None) -> list[TrainedExpert]:
    """Train one expert per document (``(expert id, document text, augmentation)`` triples), all in one batch.
    ``on_epoch(epoch, experts)`` sees the experts after each epoch (the learning rate is constant, so
    they are the experts a run of that many epochs gives: one run gives a whole epochs curve)."""
    insts = [training_instances(base.tokenizer, text, aug, cfg.max_length) for _, text, aug in docs]
    for (eid, _, _), i in zip(docs, insts):
        if not i:
            raise ValueError(f"train_experts: document {eid!r} gives no training tokens (empty text?)")
    return _train(base, [eid for eid, _, _ in docs], insts, cfg, on_epoch)


def train_adapter(base: BaseLM, docs: list[tuple[str, Augmentation]], cfg: TrainConfig = TrainConfig(),
                  adapter_id: str = "sft") -> TrainedExpert:
    """One LoRA on every document's instances, in document order (SFT-LoRA, the DMoE paper's baseline):
    the same recipe and placement as an expert, on the whole corpus."""
    insts = [i for text, aug in docs for i in training_instances(base.tokenizer, text, aug, cfg.max_length)]
    if not insts:
        raise ValueError("train_adapter: the documents give no training tokens")
    return _train(base, [adapter_id], [insts], cfg)[0]


def _train(base: BaseLM, ids: list[str], insts: list[list[Instance]], cfg: TrainConfig,
           on_epoch: Callable[[int, list[TrainedExpert]], None] | None = None) -> list[TrainedExpert]:
    """Expert ``ids[e]`` trained on ``insts[e]``, all experts in one batch (see the module docstring)."""
    last = base.last
    attach(last)
    shapes = last.shapes()
    names = last.projection_names
    flat = iter(residuals(base, [i for doc in insts for i in doc]))  # one body pass for the whole group
    data = [[next(flat) for _ in doc] for doc in insts]
    inits = [init_expert(shapes, cfg.lora, torch.Generator().manual_seed(expert_seed(cfg.seed, eid))) for eid in ids]
    dev = base.device  # the init is drawn on the CPU, so it is the same on every device
    a = {n: torch.stack([e[f"{n}.lora_a"] for e in inits]).to(dev).requires_grad_() for n in names}
    b = {n: torch.stack([e[f"{n}.lora_b"] for e in inits]).to(dev).requires_grad_() for n in names}
    opt = _ExpertAdamW([*a.values(), *b.values()], cfg.lr, cfg.weight_decay)
    experts = ExpertSet(a=a, b=b)
    head = last.head
    E = len(ids)
    steps = [math.ceil(len(d) / cfg.batch_size) for d in data]
    loss_sum, loss_n = torch.zeros(E, dtype=torch.float64), torch.zeros(E)
    for epoch in range(cfg.epochs):
        loss_sum.zero_()  # the loss reported is the epoch's
        loss_n.zero_()
        for s in range(max(steps)):
            active = [e for e in range(E) if s < steps[e]]
            xs, ts, idx, ws = [], [], [], []
            for e in active:
                batch = data[e][s * cfg.batch_size:(s + 1) * cfg.batch_size]
                n_tok = sum(len(t) for _, t in batch)
                for x, t in batch:
                    xs.append(x), ts.append(t)
                    idx.append(torch.full((len(t),), e)), ws.append(torch.full((len(t),), 1.0 / n_tok))
            x, t, i, w = torch.cat(xs), torch.cat(ts), torch.cat(idx).to(dev), torch.cat(ws).to(dev)
            routing = Routing(experts, i[:, None], torch.full((len(i), 1), cfg.lora.scale, device=dev))
            with use_experts(routing):
                hidden = last.hidden(x)
            total, per_row = chunked_lm_loss(hidden, head.weight, getattr(head, "bias", None), t, w, cfg.head_chunk)
            total.backward()
            opt.step(torch.tensor(active))
            step_loss = torch.zeros(E, dtype=torch.float64).index_add_(0, i.cpu(), (per_row * w).double().cpu())
            loss_sum[active] += step_loss[active]
            loss_n[active] += 1
        if on_epoch is not None and epoch < cfg.epochs - 1:
            on_epoch(epoch + 1, _experts(ids, names, a, b, loss_sum / loss_n))
    out = _experts(ids, names, a, b, loss_sum / loss_n)
    if on_epoch is not None:
        on_epoch(cfg.epochs, out)
    return out


def _experts(ids, names, a, b, loss) -> list[TrainedExpert]:
    return [TrainedExpert(id=eid, tensors={**{f"{n}.lora_a": a[n][k].detach().cpu().clone() for n in names},
                                           **{f"{n}.lora_b": b[n][k].detach().cpu().clone() for n in names}},
                          loss=float(loss[k]))
            for k, eid in enumerate(ids)]
