"""DMoE inference (§3.1-3.3): the token-uncertainty trigger, BM25 routing on the prefix, and
re-prediction of the triggering position with the new experts.

At each decoding step the next-token distribution of every sequence is read; where its entropy
``TU = -sum p log p`` exceeds ``tau``, the routing query is that sequence's prompt plus generated
prefix (the tokens before the position being predicted, the last ``query_tokens`` of them), the top-k
experts, weighted by the composition (:mod:`doe_ext.dmoe.routing`), become its active set, and the
position is predicted again with them. Every sequence of a batch has its own set (a mixed batch
through ``multi_lora_linear``), kept until its next trigger.

:meth:`DMoE.generate` is three parts: :meth:`~DMoE.prefill` (the prompts, sharing a common prefix),
:meth:`~DMoE.step` (one token per live sequence) and :meth:`~DMoE.repredict` (the triggered rows
with their new experts). Re-prediction depends on where the experts sit (:class:`ExpertSite`): after
the last attention (DMoE's design) only the last MLP block, the final norm and the head run again, on
the residual already computed for the position, and no layer's KV cache changes; experts on deeper
layers (Table 3's variant) make the rows' KV cache stale from their first layer on, so those rows
run again from the first token with the new set and their cache is replaced.
"""
from __future__ import annotations

import contextlib
import copy
import html
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Collection, Sequence

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from doe_ext import threads
from doe_ext.dmoe.bank import BankError, ExpertBank
from doe_ext.dmoe.base import BaseLM
from doe_ext.dmoe.cache import PreallocatedCache, common_prefix, fill_from_end
from doe_ext.dmoe.experts import ActiveExperts, ExpertSet, ExpertSite, use_experts
from doe_ext.dmoe.reader import READER_ID, Reader
from doe_ext.dmoe.routing import DEFAULT_COMPOSE, DEFAULT_TEMPERATURE, Router, check_composition, compose
from doe_ext.nn.lean import LeanDecoder
from doe_ext.nn.streaming import plain_linears, streaming_linears
from doe_ext.ops import lora_merge

WeightedSet = list[tuple[str, float]]


@dataclass
class Trigger:
    position: int  # index of the generated token that was predicted again (0: the first new token)
    entropy: float  # TU of the distribution that triggered (before the new experts)
    experts: list[str]  # the sequence's new active set, best first
    weights: list[float] = field(default_factory=list)  # their composition weights


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


@dataclass
class DecodeState:
    """A batch being decoded. Row ``j`` of every tensor is sequence ``running[j]`` of the batch."""

    cache: DynamicCache
    ids: Tensor  # [R, T] every token fed so far (the shared prefix, left padding, prompt, generated)
    mask: Tensor  # [R, T]
    running: list[int]  # the sequences still generating
    sets: list[WeightedSet]  # per sequence of the batch (all of them), its active experts
    active: ActiveExperts | None  # the running rows' sets, stacked
    residual: Tensor | None = None  # [R, d] the residual entering the last MLP block at the newest position


class DMoE:
    """A frozen base LM with a bank of LoRA experts (wrapped PEFT-style, see :mod:`doe_ext.dmoe.experts`).

    Args:
        base: from :func:`doe_ext.dmoe.load_base`.
        bank: an :class:`ExpertBank` built for this base (checked by fingerprint; an empty bank is refused),
            or None: the base alone (``tau`` must be ``inf``), with this class's batched decoding and prefix
            sharing (the distillation teacher uses it).
        tau: the trigger threshold on TU (DMoE: 2.0); ``math.inf`` never triggers (the base model).
        top_k: experts per trigger (DMoE: 3).
        compose: how the ``top_k`` experts combine: ``"sum"`` (DMoE's eq. 6), ``"mean"``, ``"score"``
            (softmax of the router's scores over ``temperature``; the default, chosen on the dev split)
            or ``"top1"``.
        temperature: the ``"score"`` composition's softmax temperature (BM25 score units).
        query_tokens: the routing query is the last this many tokens of the prefix (DMoE: 128).
        router: ``(query_text, k) -> [(expert id, score), ...]``, best first; the bank's BM25 by default
            (ablations swap it).
        trigger: ``(entropies [R], step) -> bool [R]``, which running sequences trigger at this step;
            TU > tau by default (ablations swap it: a random trigger).
        site: where the bank's experts sit (:class:`ExpertSite`); the last MLP by default.
        streaming: decoding steps and re-predictions run the model's linear layers through
            :func:`doe_ext.nn.streaming_linears` (the weights streamed once per step, ~2× ATen's
            one-row GEMM on the CPU; outputs equal to float rounding). False: ATen's GEMM throughout.
        lean: decoding steps of a family in :data:`doe_ext.nn.lean.LEAN_FAMILIES` (with a last-layer site
            and SDPA attention) run through :class:`~doe_ext.nn.lean.LeanDecoder`: transformers'
            arithmetic without its per-module Python (outputs equal to float rounding). False, or
            another family: the model's ``forward``.
        reader: the knowledge reader (:mod:`doe_ext.dmoe.reader`) that joins every non-empty set of
            experts: True, the bank's if it has one; False, none; or a :class:`~doe_ext.dmoe.reader.Reader`
            (checked against the bank's base and recipe).
    """

    def __init__(self, base: BaseLM, bank: ExpertBank | None, tau: float = 2.0, top_k: int = 3,
                 compose: str = DEFAULT_COMPOSE, temperature: float = DEFAULT_TEMPERATURE, query_tokens: int = 128,
                 router: Router | None = None,
                 trigger: Callable[[Tensor, int], Tensor] | None = None, site: ExpertSite | None = None,
                 streaming: bool = True, lean: bool = True, reader: "bool | Reader" = True):
        if bank is not None:
            bank.check_base(base.fingerprint)
            if len(bank) == 0:
                raise BankError(f"DMoE: the bank {bank.path} has no experts; add some with `doe-ext dmoe add`")
        if not isinstance(reader, bool) and bank is None:
            raise ValueError("DMoE: a `reader` needs a bank of experts to read")
        if top_k < 1:
            raise ValueError(f"DMoE: `top_k` must be >= 1, got {top_k}")
        check_composition(compose, temperature)
        self.base, self.bank, self.tau, self.top_k, self.query_tokens = base, bank, tau, top_k, query_tokens
        self.compose, self.temperature = compose, temperature
        self.router = router or (bank.search if bank is not None else None)
        self.trigger = trigger
        self.site = (site or base.site).attach()
        self.reader = (bank.reader() if reader is True and bank is not None else
                       None if reader is False or bank is None else reader)
        if self.reader is not None:
            self.reader.check(bank.fingerprint, bank.recipe, self.site.names, where=f"bank {bank.path}")
        self.streaming = streaming
        self._linears = plain_linears(base.model)  # once: a step only switches them (the site wraps, never replaces)
        self._site_linears = plain_linears(self.site.mlp) + plain_linears(self.site.head)  # a re-prediction's
        self._lean = (LeanDecoder(base.model, streaming)
                      if lean and self.site.keeps_cache and LeanDecoder.unsupported(base.model) is None else None)
        self.recomputed_tokens = 0  # tokens run again because a trigger made their KV cache stale
        self.repredicted_rows = 0  # triggered positions predicted again (a trigger that routes to the set
        # already active keeps its logits: they were computed with that set)
        self.repredict_same_set = False  # True: re-predict at every trigger (the slower reference the tests compare with)
        self._kept_prefix: tuple[list[int], DynamicCache | None] = ([], None)
        self._line_breaks: set[int] | None = None  # where an answer after demonstrations ends (ask)

    def route(self, query: str, top_k: int, router: Router | None = None) -> WeightedSet:
        """The weighted set for a query: the router's top-k, composed."""
        return compose((router or self.router)(query, top_k), self.compose, self.temperature)

    def activate(self, sets: Sequence[WeightedSet]) -> ActiveExperts | None:
        """Weighted sets (one per row) -> the rows' :class:`ActiveExperts`, on the model's device; the
        reader, if any, joins every non-empty set (:data:`~doe_ext.dmoe.reader.READER_ID`, once)."""
        if not any(sets):
            return None
        if self.reader is not None:
            slot = (READER_ID, self.reader.weight(self.bank.lora.scale))
            sets = [list(s) + [slot] if s and all(e != READER_ID for e, _ in s) else s for s in sets]
        return ActiveExperts.from_sets(sets, self._load, self.bank.lora.scale, self.base.device)

    def _load(self, ids: list[str]) -> ExpertSet:
        return ExpertSet.stack([self.reader.tensors if e == READER_ID else self.bank.get(e) for e in ids],
                               self.site.names)

    def eos_tokens(self) -> set[int]:
        return eos_tokens(self.base)

    def encode(self, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
        enc = [self.base.tokenizer(p)["input_ids"] for p in prompts]  # sequence starts: BOS where the model has one
        limit = self.base.max_positions
        for i, ids in enumerate(enc):
            if not ids:
                raise ValueError(f"DMoE.generate: prompt {i} is empty")
            if limit is not None and len(ids) + max_new_tokens > limit:
                raise ValueError(f"DMoE.generate: prompt {i} has {len(ids)} tokens; with max_new_tokens="
                                 f"{max_new_tokens} it exceeds the model's context of {limit} positions")
        return enc

    # -- the three parts of generation -------------------------------------------------------------
    def _prefix_cache(self, prefix: list[int], reuse: int) -> DynamicCache:
        """A fresh KV cache of ``prefix`` (one sequence). The last one computed is kept: when it and
        ``prefix`` start with the same ``reuse`` tokens or more, that part is copied and only the rest
        runs. A last-layer site's experts leave every layer's KV alone, so any call may reuse it."""
        kept_ids, kept = self._kept_prefix
        c = common_prefix(kept_ids, prefix)
        if c < len(kept_ids) and kept is not None and any(full_window(layer) for layer in kept.layers):
            c = 0  # transformers cannot roll a sliding-window layer back once its window is full
        if c >= reuse:
            cache = copy.deepcopy(kept)
            if c < len(kept_ids):
                cache.crop(c - len(kept_ids))  # transformers 5: a negative count of tokens to remove
        else:
            c, cache = 0, PreallocatedCache(self.base.model.config)
        if c < len(prefix):
            ids = torch.tensor([prefix[c:]], device=self.base.device)
            self.base.model(input_ids=ids, position_ids=torch.arange(c, len(prefix), device=ids.device)[None],
                            cache=cache, use_cache=True, logits_to_keep=1)
            self._kept_prefix = (list(prefix), copy.deepcopy(cache))
        return cache

    def prefill(self, enc: list[list[int]], sets: list[WeightedSet], share_prefix: int) -> tuple[DecodeState, Tensor]:
        """Run the prompts (left-padded; a prefix every prompt starts with runs once when it has
        ``share_prefix`` tokens or more, and only with a last-layer site, whose experts leave the KV
        cache alone) with their starting sets. Returns the state and the next-token logits ``[B, V]``."""
        model, dev, pad = self.base.model, self.base.device, self.base.tokenizer.pad_token_id
        B = len(enc)
        shared = min(min(common_prefix(enc[0], e) for e in enc), min(map(len, enc)) - 1)
        shared = shared if share_prefix > 0 and shared >= share_prefix and self.site.keeps_cache else 0
        if shared:  # the prefix once (or what a previous call left of it), repeated; suffixes left-padded after it
            cache = self._prefix_cache(enc[0][:shared], share_prefix)
            if len({len(e) for e in enc}) > 1 and any(getattr(layer, "is_sliding", False) for layer in cache.layers):
                return self._prefill_rows(cache, enc, sets, shared)
            cache.batch_repeat_interleave(B)
        else:
            cache = PreallocatedCache(model.config)
        rest = [e[shared:] for e in enc]
        L = max(map(len, rest))
        ids = torch.tensor([enc[0][:shared] + [pad] * (L - len(e)) + e for e in rest], device=dev)
        mask = torch.tensor([[1] * shared + [0] * (L - len(e)) + [1] * len(e) for e in rest], device=dev)
        state = DecodeState(cache, ids, mask, list(range(B)), [list(s) for s in sets], self.activate(sets))
        logits = self._forward(state, ids[:, shared:], mask, positions(mask)[:, shared:])
        return state, logits

    def _prefill_rows(self, prefix: DynamicCache, enc: list[list[int]], sets: list[WeightedSet],
                      shared: int) -> tuple[DecodeState, Tensor]:
        """:meth:`prefill` for a model with sliding-window layers: padding between the shared prefix and a
        shorter suffix would take slots of the window, and the suffix would see fewer prefix tokens than
        it does alone. So each row runs its suffix after its own copy of the prefix's cache, and the
        rows' caches are stacked right-aligned: the cache of the whole prompts left-padded."""
        dev, pad = self.base.device, self.base.tokenizer.pad_token_id
        rows, logits, residuals = [], [], []
        for e, s in zip(enc, sets):
            one = DecodeState(copy.deepcopy(prefix), torch.tensor([e], device=dev), None, [0], [list(s)],
                              self.activate([s]))
            logits.append(self._forward(one, one.ids[:, shared:], torch.ones_like(one.ids),
                                        torch.arange(shared, len(e), device=dev)[None]))
            rows.append(one.cache)
            residuals.append(one.residual)
        L = max(map(len, enc))
        ids = torch.tensor([[pad] * (L - len(e)) + e for e in enc], device=dev)
        mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in enc], device=dev)
        state = DecodeState(stack_right_aligned(rows), ids, mask, list(range(len(enc))), [list(s) for s in sets],
                            self.activate(sets), torch.cat(residuals))
        return state, torch.cat(logits)

    def _forward(self, state: DecodeState, ids: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        with self.site.capture() as cap, use_experts(state.active):
            logits = self.base.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=state.cache,
                                     use_cache=True, logits_to_keep=1).logits[:, -1]
        state.residual = cap.value[:, -1]
        return logits

    def _streaming(self, site: bool = False):
        """The context of a decoding step: the linear layers streamed (see ``streaming``; with ``site``,
        only those of the last MLP and the head, all that a re-prediction runs), or nothing."""
        if not self.streaming:
            return contextlib.nullcontext()
        return streaming_linears(self._site_linears if site else self._linears)

    def step(self, state: DecodeState, tokens: Tensor) -> Tensor:
        """Feed one token per running sequence; the next-token logits ``[R, V]``. With a last-layer site
        on a family :class:`~doe_ext.nn.lean.LeanDecoder` supports, the layers up to the last MLP block
        run through it, and the rest is the site's re-prediction path (its experts active)."""
        state.ids = torch.cat([state.ids, tokens[:, None]], 1)
        state.mask = torch.cat([state.mask, state.mask.new_ones(len(state.running), 1)], 1)
        pos = positions(state.mask)[:, -1:]
        if self._lean is None:
            with self._streaming():
                return self._forward(state, tokens[:, None], state.mask, pos)
        state.residual = self._lean.residual(tokens[:, None], state.mask, pos, state.cache)
        with use_experts(state.active), self._streaming(site=True):
            return self.site.logits(state.residual)

    def repredict(self, state: DecodeState, rows: list[int], logits: Tensor) -> None:
        """Predict the newest position of ``rows`` (of the running batch) again with their sets (already
        in ``state.sets``), in place in ``logits``; ``state.active`` follows the new sets."""
        sel = torch.tensor(rows, device=logits.device)
        new = self.activate([state.sets[state.running[j]] for j in rows])
        if self.site.keeps_cache:
            with use_experts(new), self._streaming(site=True):
                logits[sel] = self.site.logits(state.residual[sel]).to(logits.dtype)
        else:  # deeper experts: the rows run again from the first token with the new set, their cache replaced
            fresh = DynamicCache(config=self.base.model.config)
            with self.site.capture() as cap, use_experts(new):
                out = self.base.model(input_ids=state.ids[sel], attention_mask=state.mask[sel],
                                      position_ids=positions(state.mask[sel]), cache=fresh, use_cache=True,
                                      logits_to_keep=1).logits[:, -1]
            for mine, theirs in zip(state.cache.layers, fresh.layers):
                mine.keys[sel], mine.values[sel] = theirs.keys, theirs.values
            logits[sel] = out.to(logits.dtype)
            state.residual[sel] = cap.value[:, -1]
            self.recomputed_tokens += int(state.mask[sel].sum())
        state.active = self.activate([state.sets[b] for b in state.running])

    def keep(self, state: DecodeState, rows: list[int]) -> list[int]:
        """Only ``rows`` of the running batch go on (finished sequences leave it and the KV cache), in the
        order of :func:`~doe_ext.dmoe.cache.fill_from_end` (the rows beyond the smaller batch move into
        the holes, so the cache moves one row per finished one). Returns that order."""
        rows = fill_from_end(len(state.running), rows)
        sel = torch.tensor(rows, device=state.ids.device)
        state.cache.batch_select_indices(sel)
        state.ids, state.mask, state.residual = state.ids[sel], state.mask[sel], state.residual[sel]
        state.running = [state.running[j] for j in rows]
        if state.active is not None:
            state.active = state.active.select(sel)
        return rows

    @torch.no_grad()
    def generate(self, prompts: str | list[str], max_new_tokens: int = 32, tau: float | None = None,
                 top_k: int | None = None, route_texts: list[str] | None = None,
                 experts: list[WeightedSet] | None = None, stop_tokens: Collection[int] = (),
                 share_prefix: int = 16, routers: list[Router] | None = None) -> list[Generation]:
        """Greedy generation of a batch of prompts (already formatted, e.g. by ``qa_prompt``).

        ``route_texts``: per prompt, the task input that stands for it in routing queries (``ask`` gives
        the question, so that a chat template's system text is not part of the BM25 query); by default
        the prompt itself. A query is that text's tokens plus the tokens generated so far, the last
        ``query_tokens`` of them, decoded without special tokens.

        ``experts``: per prompt, a weighted set ``[(id, weight), ...]`` active from the first position on
        (the prompt included), as PRAG applies its merged experts; a trigger replaces it as usual.

        ``routers``: per prompt, a router in place of the model's (an oracle that knows each question's
        document). ``stop_tokens``: token ids that end a sequence as EOS does, but stay in its text (the evaluation
        stops at a line break). ``share_prefix``: when every prompt of the batch starts with the same
        this many tokens or more (few-shot demonstrations, a chat template's system text), that prefix
        runs once and its KV cache is repeated over the batch (0: never); the next call reuses the part
        of it that its own prompts start with. The outputs are those of the unshared run, up to float
        rounding. A sequence that has ended leaves the batch."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for name, v in (("route_texts", route_texts), ("experts", experts), ("routers", routers)):
            if v is not None and len(v) != len(prompts):
                raise ValueError(f"DMoE.generate: {len(v)} `{name}` for {len(prompts)} prompts")
        tau = self.tau if tau is None else tau
        top_k = self.top_k if top_k is None else top_k
        if self.bank is None and (tau != math.inf or experts is not None):
            raise ValueError("DMoE.generate: without a bank there are no experts: `tau` must be inf and `experts` None")
        tok = self.base.tokenizer
        enc = self.encode(prompts, max_new_tokens)
        B = len(enc)
        eos = self.eos_tokens()
        stop = eos | set(stop_tokens)
        queries = ([tok(r, add_special_tokens=False)["input_ids"] for r in route_texts] if route_texts is not None
                   else [list(e) for e in enc])  # what routing queries are made of
        out = [Generation([], "") for _ in range(B)]
        state, logits = self.prefill(enc, list(experts) if experts is not None else [[] for _ in range(B)],
                                     share_prefix)
        for t in range(max_new_tokens):
            threads.rebalance()  # cores back to a command started beside this one (a no-op unless claimed)
            ent = token_entropy(logits)
            fires = (ent > tau) if self.trigger is None else self.trigger(ent, t)
            triggered = [j for j in range(len(state.running)) if bool(fires[j])]
            changed = []  # the triggered rows routed to another set than the one their logits were computed with
            for j in triggered:
                b = state.running[j]
                query = tok.decode(queries[b][-self.query_tokens:], skip_special_tokens=True)
                new = self.route(query, top_k, routers[b] if routers is not None else None)
                if self.repredict_same_set or [tuple(x) for x in new] != [tuple(x) for x in state.sets[b]]:
                    changed.append(j)
                state.sets[b] = new
            if changed:
                self.repredict(state, changed, logits)
            self.repredicted_rows += len(changed)
            nxt = logits.argmax(-1)
            p_nxt = torch.softmax(logits.float(), -1).gather(1, nxt[:, None])[:, 0]
            going = []
            for j, b in enumerate(state.running):
                x = nxt[j].item()
                out[b].entropies.append(ent[j].item())
                if j in triggered:
                    out[b].triggers.append(Trigger(t, ent[j].item(), [e for e, _ in state.sets[b]],
                                                   [w for _, w in state.sets[b]]))
                out[b].tokens.append(x)
                out[b].token_probs.append(p_nxt[j].item())
                queries[b].append(x)
                if x not in stop:
                    going.append(j)
            if not going or t == max_new_tokens - 1:
                break
            if len(going) < len(state.running):
                nxt = nxt[torch.tensor(self.keep(state, going), device=nxt.device)]
            logits = self.step(state, nxt)
        for g in out:
            g.text = tok.decode([x for x in g.tokens if x not in eos], skip_special_tokens=True).strip()
        return out

    def ask(self, question: str, max_new_tokens: int = 32, tau: float | None = None,
            top_k: int | None = None) -> Generation:
        """Answer one question, closed book, in the prompt layout the bank's experts were trained in
        (:func:`~doe_ext.dmoe.augment.expert_shots`: after short demonstrations for the default recipe,
        the answer ending at a line break; the chat template for next-token experts); routed on the
        question and the answer so far."""
        from doe_ext.dmoe.augment import ask_prompt, expert_shots

        shots = expert_shots(self.bank.recipe) if self.bank is not None else ()
        if shots and self._line_breaks is None:
            self._line_breaks = line_break_tokens(self.base.tokenizer)  # a pass over the vocabulary: once
        stop = self._line_breaks if shots else ()
        return self.generate(ask_prompt(self.base.tokenizer, question, None, shots), max_new_tokens, tau, top_k,
                             route_texts=[question], stop_tokens=stop)[0]


def full_window(layer) -> bool:
    """A sliding-window cache layer that has dropped its oldest states (it cannot be cropped)."""
    return getattr(layer, "is_sliding", False) and layer.get_seq_length() >= layer.get_max_length()


def stack_right_aligned(caches: list[DynamicCache]) -> DynamicCache:
    """One-row caches of different lengths -> one batch cache (the first one, reused), each row's states
    right-aligned after zeros that the attention mask hides, as a left-padded batch's cache is."""
    out = caches[0]
    for i, layer in enumerate(out.layers):
        rows = [c.layers[i] for c in caches]
        n = max(r.keys.shape[-2] for r in rows)
        layer.keys, layer.values = (torch.cat([torch.nn.functional.pad(t, (0, 0, n - t.shape[-2], 0)) for t in ts])
                                    for ts in ([r.keys for r in rows], [r.values for r in rows]))
        if getattr(layer, "is_sliding", False):
            layer.cumulative_length = max(r.cumulative_length for r in rows)
    return out


def positions(mask: Tensor) -> Tensor:
    """Position ids of a left-padded batch (padding at 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


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


def merged_state(site: ExpertSite, experts: Sequence[dict[str, Tensor]], scales: Sequence[float]) -> dict[str, Tensor]:
    """The site's projection weights ``theta + sum_e scales[e] * B_e @ A_e`` (``[out, in]``, by the
    package's ``lora_merge`` op): PRAG's merge, and the reference the tests compare DMoE against."""
    out = {}
    for name, w in site.weights().items():
        w = w.detach()
        if not experts:
            out[name] = w.clone()
            continue
        a = torch.stack([e[f"{name}.lora_a"] for e in experts]).to(w)
        b = torch.stack([e[f"{name}.lora_b"] for e in experts]).to(w)
        out[name] = lora_merge(w.contiguous(), a, b, torch.tensor(list(scales), dtype=w.dtype, device=w.device))
    return out
