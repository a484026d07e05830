"""DMoE inference (§3.1-3.3): the token-uncertainty trigger, BM25 routing on the prefix, and
re-prediction of the triggering position with the new experts, without touching the KV cache.

At each decoding step the next-token distribution of every sequence is read; where its entropy
``TU = -sum p log p`` exceeds ``tau``, the routing query is that sequence's prompt plus generated
prefix (the tokens before the position being predicted, the last ``query_tokens`` of them), the top-k
experts become its active set (``theta + sum of deltas``, eq. 6), and the position is predicted again
by re-running only the last MLP block, the final norm and the head on the residual already computed
for it. Earlier layers, and so the KV cache of every layer, do not depend on the experts. Every
sequence of a batch has its own set (a mixed batch through ``multi_lora_linear``), kept until its
next trigger.
"""
from __future__ import annotations

import copy
import html
from dataclasses import asdict, dataclass, field
from typing import Callable, Collection

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from doe_ext.dmoe.bank import BankError, ExpertBank
from doe_ext.dmoe.base import BaseLM, capture_residual, linear_weight, unwrap
from doe_ext.dmoe.experts import Routing, attach, use_experts
from doe_ext.dmoe.train import common_prefix


@dataclass
class Trigger:
    position: int  # index of the generated token that was predicted again (0: the first new token)
    entropy: float  # TU of the distribution that triggered (before the new experts)
    experts: list[str]  # the sequence's new active set, best first


@dataclass
class Generation:
    """One sequence's output: the new tokens, their text and the trigger trace."""

    tokens: list[int]
    text: str
    triggers: list[Trigger] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)  # TU at every step, before any re-prediction
    token_probs: list[float] = field(default_factory=list)  # probability of each chosen token (FLARE's signal)

    def to_dict(self) -> dict:
        return {"answer": self.text, "triggers": [asdict(t) for t in self.triggers]}

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{t.position}</td><td>{t.entropy:.3f}</td><td>{html.escape(', '.join(t.experts))}</td></tr>"
                       for t in self.triggers)
        return (f"<p><b>answer</b>: {html.escape(self.text)}</p><table><tr><th>position</th><th>entropy</th>"
                f"<th>experts</th></tr>{rows}</table>")


def token_entropy(logits: Tensor) -> Tensor:
    """``-sum p log p`` over the last dim, in float32."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


class DMoE:
    """A frozen base LM with a bank of LoRA experts on its last MLP (wrapped PEFT-style, see
    :mod:`doe_ext.dmoe.experts`).

    Args:
        base: from :func:`doe_ext.dmoe.load_base`.
        bank: an :class:`ExpertBank` built for this base (checked by fingerprint; an empty bank is refused).
        tau: the trigger threshold on TU (DMoE: 2.0); ``math.inf`` never triggers (the base model).
        top_k: experts per trigger (DMoE: 3).
        query_tokens: the routing query is the last this many tokens of the prefix (DMoE: 128).
        router: ``(query_text, k) -> expert ids``; the bank's BM25 by default (ablations swap it).
        trigger: ``(entropies [B], step) -> bool [B]``, which sequences trigger at this step; TU > tau
            by default (ablations swap it: a random trigger).
    """

    def __init__(self, base: BaseLM, bank: ExpertBank, tau: float = 2.0, top_k: int = 3, query_tokens: int = 128,
                 router: Callable[[str, int], list[str]] | None = None,
                 trigger: Callable[[Tensor, int], Tensor] | None = None):
        bank.check_base(base.fingerprint)
        if len(bank) == 0:
            raise BankError(f"DMoE: the bank {bank.path} has no experts; add some with `doe-ext dmoe add`")
        if top_k < 1:
            raise ValueError(f"DMoE: `top_k` must be >= 1, got {top_k}")
        self.base, self.bank, self.tau, self.top_k, self.query_tokens = base, bank, tau, top_k, query_tokens
        self.router = router or bank.route
        self.trigger = trigger
        self.last = base.last
        attach(self.last)
        self.scale = bank.lora.scale
        self._kept_prefix: tuple[list[int], DynamicCache | None] = ([], None)

    def _routing(self, sets: list[list[str]]) -> Routing | None:
        """One Routing for per-row expert sets (rows without experts get empty slots)."""
        union = list(dict.fromkeys(e for s in sets for e in s))
        if not union:
            return None
        pos = {e: i for i, e in enumerate(union)}
        k = max(len(s) for s in sets)
        idx = torch.full((len(sets), k), -1, dtype=torch.long)
        for r, s in enumerate(sets):
            idx[r, :len(s)] = torch.tensor([pos[e] for e in s], dtype=torch.long)
        dev = self.base.device
        experts = self.bank.load(union, self.last.projection_names)
        experts = experts.to(dev)
        return Routing(experts, idx.to(dev), torch.full((len(sets), k), self.scale, device=dev))

    def eos_tokens(self) -> set[int]:
        return eos_tokens(self.base)

    def _prefix_cache(self, prefix: list[int], reuse: int) -> DynamicCache:
        """A fresh KV cache of ``prefix`` (one sequence). The last one computed is kept: when it and
        ``prefix`` start with the same ``reuse`` tokens or more, that part is copied and only the rest
        runs. The KV of every layer does not depend on the experts, so any call may reuse it."""
        kept_ids, kept = self._kept_prefix
        c = common_prefix(kept_ids, prefix)
        if c >= reuse:
            cache = copy.deepcopy(kept)
            if c < len(kept_ids):
                cache.crop(c - len(kept_ids))  # transformers 5: a negative count of tokens to remove
        else:
            c, cache = 0, DynamicCache(config=self.base.model.config)
        if c < len(prefix):
            ids = torch.tensor([prefix[c:]], device=self.base.device)
            self.base.model(input_ids=ids, position_ids=torch.arange(c, len(prefix), device=ids.device)[None],
                            cache=cache, use_cache=True, logits_to_keep=1)
            self._kept_prefix = (list(prefix), copy.deepcopy(cache))
        return cache

    def encode(self, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
        enc = [self.base.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        limit = self.base.max_positions
        for i, ids in enumerate(enc):
            if not ids:
                raise ValueError(f"DMoE.generate: prompt {i} is empty")
            if limit is not None and len(ids) + max_new_tokens > limit:
                raise ValueError(f"DMoE.generate: prompt {i} has {len(ids)} tokens; with max_new_tokens="
                                 f"{max_new_tokens} it exceeds the model's context of {limit} positions")
        return enc

    @torch.no_grad()
    def generate(self, prompts: str | list[str], max_new_tokens: int = 32, tau: float | None = None,
                 top_k: int | None = None, route_texts: list[str] | None = None,
                 experts: list[list[str]] | None = None, stop_tokens: Collection[int] = (),
                 share_prefix: int = 16, routers: list[Callable[[str, int], list[str]]] | None = None
                 ) -> list[Generation]:
        """Greedy generation of a batch of prompts (already formatted, e.g. by ``qa_prompt``).

        ``route_texts``: per prompt, the task input that stands for it in routing queries (``ask`` gives
        the question, so that a chat template's system text is not part of the BM25 query); by default
        the prompt itself. A query is that text's tokens plus the tokens generated so far, the last
        ``query_tokens`` of them, decoded without special tokens.

        ``experts``: per prompt, an active set from the first position on (the prompt included), as
        PRAG applies its merged experts; a trigger replaces it as usual.

        ``routers``: per prompt, a router in place of the model's (an oracle that knows each question's
        document). ``stop_tokens``: token ids that end a sequence as EOS does, but stay in its text (the evaluation
        stops at a line break). ``share_prefix``: when every prompt of the batch starts with the same
        this many tokens or more (few-shot demonstrations, a chat template's system text), that prefix
        runs once and its KV cache is repeated over the batch (0: never); the next call reuses the part
        of it that its own prompts start with. The KV cache of every layer is independent of the
        experts (they sit after the last attention), so the outputs are those of the unshared run, up
        to float rounding. A sequence that has ended leaves the batch."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for name, v in (("route_texts", route_texts), ("experts", experts), ("routers", routers)):
            if v is not None and len(v) != len(prompts):
                raise ValueError(f"DMoE.generate: {len(v)} `{name}` for {len(prompts)} prompts")
        tau = self.tau if tau is None else tau
        top_k = self.top_k if top_k is None else top_k
        model, tok = self.base.model, self.base.tokenizer
        enc = self.encode(prompts, max_new_tokens)
        B = len(enc)
        pad = tok.pad_token_id
        dev = self.base.device
        shared = min(min(common_prefix(enc[0], e) for e in enc), min(map(len, enc)) - 1)
        shared = shared if share_prefix > 0 and shared >= share_prefix else 0
        if shared:  # the prefix once (or what a previous call left of it), repeated; suffixes left-padded after it
            cache = self._prefix_cache(enc[0][:shared], share_prefix)
            cache.batch_repeat_interleave(B)
        else:
            cache = DynamicCache(config=model.config)
        rest = [e[shared:] for e in enc]
        L = max(map(len, rest))
        ids = torch.tensor([[pad] * (L - len(e)) + e for e in rest], device=dev)
        mask = torch.tensor([[1] * shared + [0] * (L - len(e)) + [1] * len(e) for e in rest], device=dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        eos = self.eos_tokens()
        stop = eos | set(stop_tokens)
        seqs = ([tok(r, add_special_tokens=False)["input_ids"] for r in route_texts] if route_texts is not None
                else [list(e) for e in enc])  # what routing queries are made of
        out = [Generation([], "") for _ in range(B)]
        active: list[list[str]] = [list(e) for e in experts] if experts is not None else [[] for _ in range(B)]
        routing = self._routing(active)
        live = list(range(B))  # the sequences still generating, in the order of the batch's rows
        with capture_residual(self.last) as cap:
            with use_experts(routing):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                               use_cache=True, logits_to_keep=1).logits[:, -1]
            for t in range(max_new_tokens):
                ent = token_entropy(logits)
                fire = (ent > tau) if self.trigger is None else self.trigger(ent, t)
                trig = [j for j in range(len(live)) if bool(fire[j])]  # rows of the live batch
                resid = cap.value  # before routing: a router may run the model itself (a dense retriever)
                for j in trig:
                    b = live[j]
                    query = tok.decode(seqs[b][-self.query_tokens:], skip_special_tokens=True)
                    active[b] = list((routers[b] if routers is not None else self.router)(query, top_k))
                if trig:
                    rows = torch.tensor(trig, device=dev)
                    with use_experts(self._routing([active[live[j]] for j in trig])):
                        logits[rows] = self.last.logits(resid[rows, -1]).to(logits.dtype)
                    routing = self._routing([active[b] for b in live])
                nxt = logits.argmax(-1)
                p_nxt = torch.softmax(logits.float(), -1).gather(1, nxt[:, None])[:, 0]
                fired = set(trig)
                keep = []
                for j, b in enumerate(live):
                    x = nxt[j].item()
                    out[b].entropies.append(ent[j].item())
                    if j in fired:
                        out[b].triggers.append(Trigger(t, ent[j].item(), list(active[b])))
                    out[b].tokens.append(x)
                    out[b].token_probs.append(p_nxt[j].item())
                    seqs[b].append(x)
                    if x not in stop:
                        keep.append(j)
                if not keep or t == max_new_tokens - 1:
                    break
                if len(keep) < len(live):  # finished sequences leave the batch (and the KV cache)
                    sel = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(sel)
                    mask, pos, nxt = mask[sel], pos[sel], nxt[sel]
                    live = [live[j] for j in keep]
                    if routing is not None:
                        routing = Routing(routing.experts, routing.indices[sel], routing.scales[sel])
                mask = torch.cat([mask, mask.new_ones(len(live), 1)], 1)
                pos = pos[:, -1:] + 1
                with use_experts(routing):
                    logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                                   cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        for g in out:
            g.text = tok.decode([x for x in g.tokens if x not in eos], skip_special_tokens=True).strip()
        return out

    def ask(self, question: str, max_new_tokens: int = 32, tau: float | None = None,
            top_k: int | None = None) -> Generation:
        """Answer one question (the shared QA prompt, no passages; routed on the question and the answer so far)."""
        from doe_ext.dmoe.augment import qa_prompt

        return self.generate(qa_prompt(self.base.tokenizer, question), max_new_tokens, tau, top_k,
                             route_texts=[question])[0]


def eos_tokens(base: BaseLM) -> set[int]:
    """The ids that end a sequence: the generation config's EOS ids and the tokenizer's."""
    ids = base.model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if base.tokenizer.eos_token_id is not None:
        ids.add(base.tokenizer.eos_token_id)
    return ids


def line_break_tokens(tokenizer) -> set[int]:
    """Token ids whose text contains a line break (where the evaluation's answers end)."""
    return {i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])}


def merged_state(base: BaseLM, experts: list[dict[str, Tensor]], scale: float) -> dict[str, Tensor]:
    """The last MLP projections' weights ``theta + sum_e scale * B_e @ A_e`` in each module's own layout
    (PRAG's merge, and the reference the tests compare DMoE against). Projection name -> weight."""
    out = {}
    for name, module in base.last.projections().items():
        module = unwrap(module)
        w = linear_weight(module).detach()  # [out, in]
        merged = w + sum(scale * e[f"{name}.lora_b"] @ e[f"{name}.lora_a"] for e in experts) if experts else w.clone()
        out[name] = merged if isinstance(module, torch.nn.Linear) else merged.t().contiguous()
    return out
