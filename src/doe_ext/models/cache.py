"""DoE's per-sequence decoding state and the KV cache that carries it.

A cached DoE forward must remember, per sequence, more than keys and values: each layer's causal
prefix sums of the router's signal (App. H.1: the router reads the mean of v over positions <= t),
and the last router's topic prediction at every position (a generated token takes the topic
predicted at the previous position, docs/design.md#the-doe-model). :class:`DoEState` keeps both per position, so
every cache operation transformers' generation uses — ``reorder_cache`` (beam search), ``crop``
(assisted decoding), ``batch_select_indices``, ``batch_repeat_interleave`` — can apply to them
exactly as to the keys and values. :class:`DoECache` is a ``DynamicCache`` with that state; any other
``Cache`` gets a state attached on first use (enough for greedy decoding and sampling).
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache


class DoEState:
    """``sums[layer] = (csum [B, T, D], count [B, T])``: the running signal sums after each cached
    position; ``topics [B, T]``: the last router's next-topic prediction at each cached position."""

    def __init__(self):
        self.sums: dict[int, tuple[Tensor, Tensor]] = {}
        self.topics: Tensor | None = None

    def _apply(self, fn) -> None:
        self.sums = {i: (fn(s), fn(c)) for i, (s, c) in self.sums.items()}
        if self.topics is not None:
            self.topics = fn(self.topics)

    def select(self, index: Tensor) -> None:
        self._apply(lambda t: t.index_select(0, index.to(t.device)))

    def repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, length: int) -> None:
        self._apply(lambda t: t[:, :length])

    def append_sums(self, layer: int, csum: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        """Add this step's per-position sums (``csum [B, T, D]`` from its own positions) to the
        running totals; returns the totals at each new position."""
        if layer in self.sums:
            prev_s, prev_c = self.sums[layer]
            csum, count = csum + prev_s[:, -1:], count + prev_c[:, -1:]
            self.sums[layer] = (torch.cat([prev_s, csum.detach()], 1), torch.cat([prev_c, count.detach()], 1))
        else:
            self.sums[layer] = (csum.detach(), count.detach())
        return csum, count

    def append_topics(self, predicted: Tensor) -> None:
        predicted = predicted.detach()
        self.topics = predicted if self.topics is None else torch.cat([self.topics, predicted], 1)


class DoECache(DynamicCache):
    """``DynamicCache`` + :class:`DoEState`, kept aligned with the keys and values by every cache
    operation of generation (beam search reorders it, assisted decoding crops it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.doe = DoEState()

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self.doe.select(beam_idx)

    def batch_select_indices(self, indices: Tensor):
        super().batch_select_indices(indices)
        self.doe.select(indices)

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self.doe.repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int):
        super().crop(tokens_to_remove)
        self.doe.crop(self.get_seq_length())


def with_doe_cache(who: str, kwargs: dict, generation_config, model_config, needs_state: bool = True) -> dict:
    """``generate``'s keyword arguments with a :class:`DoECache` (unless the caller gave a cache or
    ``use_cache=False``); beam search without the cache is refused when the model has DoE state
    (``needs_state``): the generated tokens' topic history lives in the cache, which beams reorder."""
    config = kwargs.get("generation_config") or generation_config
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1) or 1)
    use_cache = kwargs.get("use_cache", getattr(config, "use_cache", True))
    if beams > 1 and use_cache is False and needs_state:
        raise NotImplementedError(f"{who}: beam search needs the KV cache (use_cache=True): the generated tokens' "
                                  "topic history lives in the DoECache, which beam search reorders")
    if use_cache is not False and kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
        kwargs["cache"] = DoECache(config=model_config)
    return kwargs


def doe_state(cache: Cache) -> DoEState:
    """The DoE state of ``cache`` (attached to a cache of another class on first use)."""
    state = getattr(cache, "doe", None)
    if state is None:
        state = cache.__dict__.setdefault("doe", DoEState())
    return state


def causal_prefix_mean(signal: Tensor, mask: Tensor | None, cache: Cache | None, layer_idx: int) -> Tensor:
    """Mean of ``signal [B, T, D]`` over positions <= t (padding excluded). With a KV cache the running
    sums of earlier steps live in the cache's :class:`DoEState`, so a cached step equals the
    uncached forward."""
    m = torch.ones(signal.shape[:2], dtype=signal.dtype, device=signal.device) if mask is None else mask.to(signal.dtype)
    csum = (signal * m[..., None]).cumsum(1)  # (B, T, D)
    count = m.cumsum(1)  # (B, T)
    if cache is not None:
        csum, count = doe_state(cache).append_sums(layer_idx, csum, count)
    return csum / count.clamp(min=1)[..., None]


# Topics during generation, shared by DoEForCausalLM and the drop-in DoEWrapper: a prompt token has the
# caller's topic, a generated token the topic the last router predicted at the position before it.

def step_topics(history: Tensor, cache: Cache | None, new: int) -> Tensor:
    """The topic ids of a forward's ``new`` tokens, from the sequence's topic ``history [B, T]``; one
    token after a cached prefix takes the cache's last predicted topic (reordered with the beams)."""
    state = getattr(cache, "doe", None)
    if state is not None and state.topics is not None and cache.get_seq_length() > 0 and new == 1:
        return state.topics[:, -1:]
    return history[:, -new:]


def record_next_topics(routed: list, cache: Cache | None) -> Tensor | None:
    """Each position's predicted next topic (the last router's argmax ``[B, T]``; None without
    routers), appended to the DoE state of ``cache`` when there is one."""
    if not routed:
        return None
    nxt = routed[-1].logits.argmax(-1)
    if cache is not None:
        doe_state(cache).append_topics(nxt)
    return nxt


def extend_history(history: Tensor, next_topic_ids: Tensor | None) -> Tensor:
    """``history`` with one more column: the topic predicted at its last position (-1 without routers)."""
    nxt = next_topic_ids[:, -1:] if next_topic_ids is not None else torch.full_like(history[:, -1:], -1)
    return torch.cat([history, nxt.to(history.dtype)], dim=-1)

