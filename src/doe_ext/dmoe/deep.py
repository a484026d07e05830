"""Table 3's variant: experts on the MLPs of the last 25% / 50% of the layers instead of the last one.

An expert below the last attention changes the keys and values of every later layer, so when a
trigger changes a sequence's set, the KV cache of the prefix is stale. This variant recomputes it:
the whole sequence runs again with the new set (a fresh cache), then decoding goes on. That is the
cost the paper's last-layer design avoids; :class:`DeepDMoE` counts the recomputed tokens. (Only the
layers from the first expert layer on would need it; this recomputes all of them, so its latency is
an upper bound, and ``recompute_fraction`` gives the lower one.)

Training runs the whole model (no cached residual: the experts' layers depend on each other), all
experts of a group in one padded batch through ``multi_lora_linear``, per-expert AdamW as in
:mod:`doe_ext.dmoe.train`, so its recipe means the same. One sequence at a time in generation.
"""
from __future__ import annotations

import math
from typing import Callable, Collection

import torch
from transformers.cache_utils import DynamicCache

from doe_ext.dmoe.augment import Augmentation
from doe_ext.dmoe.bank import ExpertBank
from doe_ext.dmoe.base import SPECS, BaseLM, get_path, linear_weight, unwrap
from doe_ext.dmoe.experts import ExpertLinear, ExpertSet, Routing, init_expert, use_experts
from doe_ext.dmoe.model import Generation, Trigger, eos_tokens, token_entropy
from doe_ext.dmoe.train import (TrainConfig, TrainedExpert, _ExpertAdamW, _experts, chunked_lm_loss, expert_seed,
                                training_instances)
from doe_ext.integrations.hf.adapters import adapter_for


class DeepLayers:
    """The MLP projections of the last ``fraction`` of the decoder layers, wrapped as
    ``"<layer>.<projection>"`` experts (a last-layer DMoE wrapper stays inside, unused)."""

    def __init__(self, base: BaseLM, fraction: float):
        mt, adapter = base.model.config.model_type, adapter_for(base.model)
        layers = get_path(base.model, adapter.layers)
        n = max(1, round(fraction * len(layers)))
        self.base, self.first, self.num_layers = base, len(layers) - n, len(layers)
        self.mlps = {i: get_path(layers[i], adapter.mlp) for i in range(self.first, len(layers))}
        self.projections = SPECS[mt].projections
        self.names = tuple(f"{i}.{p}" for i in self.mlps for p in self.projections)

    def attach(self) -> None:
        for i, mlp in self.mlps.items():
            for p in self.projections:
                m, names = getattr(mlp, p), set()
                while isinstance(m, ExpertLinear):
                    names.add(m.name)
                    m = m.base_layer
                if f"{i}.{p}" not in names:
                    setattr(mlp, p, ExpertLinear(getattr(mlp, p), f"{i}.{p}"))

    def detach(self) -> None:
        """Remove this variant's wrappers wherever they sit in a chain of wrappers."""
        for i, mlp in self.mlps.items():
            for p in self.projections:
                parent, attr, m = mlp, p, getattr(mlp, p)
                while isinstance(m, ExpertLinear):
                    if m.name == f"{i}.{p}":
                        setattr(parent, attr, m.base_layer)
                        break
                    parent, attr, m = m, "base_layer", m.base_layer

    def shapes(self) -> dict[str, tuple[int, int]]:
        out = {}
        for i, mlp in self.mlps.items():
            for p in self.projections:
                out[f"{i}.{p}"] = tuple(linear_weight(unwrap(getattr(mlp, p))).shape)
        return out

    @property
    def recompute_fraction(self) -> float:
        """Share of the layers whose KV a trigger makes stale."""
        return (self.num_layers - self.first) / self.num_layers


def train_deep(deep: DeepLayers, docs: list[tuple[str, str, Augmentation]], cfg: TrainConfig) -> list[TrainedExpert]:
    """One expert per document over ``deep``'s layers (PRAG's instances, the same recipe as
    :func:`doe_ext.dmoe.train.train_experts`), all in one batch per step."""
    base = deep.base
    tok, dev, pad = base.tokenizer, base.device, base.tokenizer.pad_token_id
    insts = [training_instances(tok, text, aug, cfg.max_length) for _, text, aug in docs]
    ids = [eid for eid, _, _ in docs]
    deep.attach()
    inits = [init_expert(deep.shapes(), cfg.lora, torch.Generator().manual_seed(expert_seed(cfg.seed, e))) for e in ids]
    a = {n: torch.stack([e[f"{n}.lora_a"] for e in inits]).to(dev).requires_grad_() for n in deep.names}
    b = {n: torch.stack([e[f"{n}.lora_b"] for e in inits]).to(dev).requires_grad_() for n in deep.names}
    opt = _ExpertAdamW([*a.values(), *b.values()], cfg.lr, cfg.weight_decay)
    experts, head, body = ExpertSet(a=a, b=b), base.last.head, base.model.base_model
    steps = [math.ceil(len(d) / cfg.batch_size) for d in insts]
    loss = torch.zeros(len(ids))
    for _ in range(cfg.epochs):
        loss_sum, loss_n = torch.zeros(len(ids)), torch.zeros(len(ids))
        for s in range(max(steps)):
            rows = [(e, inst) for e in range(len(ids)) if s < steps[e]
                    for inst in insts[e][s * cfg.batch_size:(s + 1) * cfg.batch_size]]
            T = max(len(i.ids) for _, i in rows)
            x = torch.tensor([i.ids + [pad] * (T - len(i.ids)) for _, i in rows], device=dev)
            mask = torch.tensor([[1] * len(i.ids) + [0] * (T - len(i.ids)) for _, i in rows], device=dev)
            sel = [(r, p) for r, (_, i) in enumerate(rows) for p in range(i.loss_start, len(i.ids) - 1)]
            r_idx = torch.tensor([r for r, _ in sel], device=dev)
            p_idx = torch.tensor([p for _, p in sel], device=dev)
            who = torch.tensor([rows[r][0] for r, _ in sel])  # the expert of each loss row
            n_tok = torch.zeros(len(ids)).index_add_(0, who, torch.ones(len(sel)))
            w = (1.0 / n_tok[who]).to(dev)
            routing = Routing(experts, torch.tensor([[e] for e, _ in rows], device=dev),
                              torch.full((len(rows), 1), cfg.lora.scale, device=dev))
            with use_experts(routing):
                hidden = body(input_ids=x, attention_mask=mask).last_hidden_state
            total, per_row = chunked_lm_loss(hidden[r_idx, p_idx], head.weight, getattr(head, "bias", None),
                                             x[r_idx, p_idx + 1], w, cfg.head_chunk)
            total.backward()
            active = sorted({e for e, _ in rows})
            opt.step(torch.tensor(active))
            loss_sum.index_add_(0, who, (per_row * w).detach().cpu().float())
            loss_n[active] += 1
        loss = loss_sum / loss_n
    return _experts(ids, deep.names, a, b, loss)


class DeepDMoE:
    """DMoE with :class:`DeepLayers` experts: the same trigger and router; on a trigger the sequence's
    KV cache is rebuilt with the new set. ``generate`` takes :meth:`DMoE.generate`'s arguments the
    evaluation harness passes (one prompt at a time inside)."""

    def __init__(self, deep: DeepLayers, bank: ExpertBank, tau: float = 2.0, top_k: int = 3, query_tokens: int = 128):
        bank.check_base(deep.base.fingerprint)
        self.deep, self.bank, self.tau, self.top_k, self.query_tokens = deep, bank, tau, top_k, query_tokens
        self.recomputed_tokens = 0

    def _routing(self, active: list[str]) -> Routing | None:
        if not active:
            return None
        dev = self.deep.base.device
        return Routing(self.bank.load(active, self.deep.names).to(dev), torch.arange(len(active), device=dev)[None],
                       torch.full((1, len(active)), self.bank.lora.scale, device=dev))

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int = 32, route_texts: list[str] | None = None,
                 routers: list[Callable[[str, int], list[str]]] | None = None, stop_tokens: Collection[int] = (),
                 **_ignored) -> list[Generation]:
        base = self.deep.base
        model, tok, dev = base.model, base.tokenizer, base.device
        eos = eos_tokens(base)
        stop = eos | set(stop_tokens)
        self.deep.attach()
        out = []
        for n, prompt in enumerate(prompts):
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            seq = tok(route_texts[n], add_special_tokens=False)["input_ids"] if route_texts else list(ids)
            router = routers[n] if routers else self.bank.route
            active: list[str] = []
            routing = None
            cache = DynamicCache(config=model.config)
            logits = model(input_ids=torch.tensor([ids], device=dev), cache=cache, use_cache=True,
                           logits_to_keep=1).logits[0, -1]
            g = Generation([], "")
            for t in range(max_new_tokens):
                ent = token_entropy(logits).item()
                g.entropies.append(ent)
                if ent > self.tau:  # new experts: the prefix's KV is stale from the first expert layer on
                    active = list(router(tok.decode(seq[-self.query_tokens:], skip_special_tokens=True), self.top_k))
                    g.triggers.append(Trigger(t, ent, list(active)))
                    cache = DynamicCache(config=model.config)
                    routing = self._routing(active)
                    with use_experts(routing):
                        logits = model(input_ids=torch.tensor([ids], device=dev), cache=cache, use_cache=True,
                                       logits_to_keep=1).logits[0, -1]
                    self.recomputed_tokens += len(ids)
                nxt = int(logits.argmax())
                g.tokens.append(nxt)
                g.token_probs.append(float(torch.softmax(logits.float(), -1)[nxt]))
                ids.append(nxt)
                seq.append(nxt)
                if nxt in stop or t == max_new_tokens - 1:
                    break
                with use_experts(routing):
                    logits = model(input_ids=torch.tensor([[nxt]], device=dev), cache=cache, use_cache=True,
                                   logits_to_keep=1).logits[0, -1]
            g.text = tok.decode([x for x in g.tokens if x not in eos], skip_special_tokens=True).strip()
            out.append(g)
        return out
