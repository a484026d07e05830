"""A KV cache that decodes without copying itself: :class:`PreallocatedCache`.

transformers' ``DynamicCache`` appends a decoding step's key and value with ``torch.cat``, which copies
the whole cache of every layer at every step, and drops finished rows with an index copy of every
row that stays. :class:`PreallocatedCache` is a ``DynamicCache`` whose full-attention layers keep
their states in a buffer with room for ``chunk`` more tokens: a step writes its token in place
(the buffer grows by a chunk when full, one copy per ``chunk`` steps), ``keys`` / ``values`` are views of
the filled part, and rows leave by moving only the rows that must move (:func:`fill_from_end` picks
an order in which that is one row per finished one). Sliding-window layers stay transformers' own.
The states are the same numbers as ``DynamicCache``'s; only where they live differs.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer whose ``[B, H, capacity, D]`` buffers hold ``n`` filled positions;
    ``keys`` / ``values`` are their ``[B, H, n, D]`` views. Assigning ``keys`` / ``values`` (as
    transformers' own cache methods do) makes the assigned tensor the buffer, full."""

    def __init__(self, chunk: int = 256, **kwargs):
        if chunk < 1:
            raise ValueError(f"PreallocatedLayer: `chunk` must be >= 1, got {chunk}")
        self.chunk = chunk
        self._n = 0
        super().__init__(**kwargs)

    @staticmethod
    def _filled(buf: Tensor | None, n: int) -> Tensor | None:
        return buf if buf is None or buf.dim() != 4 else buf[:, :, :n]

    @property
    def keys(self) -> Tensor | None:
        return self._filled(self._k, self._n)

    @keys.setter
    def keys(self, value: Tensor | None) -> None:
        self._k = value
        self._n = value.shape[-2] if value is not None and value.dim() == 4 else 0

    @property
    def values(self) -> Tensor | None:
        return self._filled(self._v, self._n)

    @values.setter
    def values(self, value: Tensor | None) -> None:
        self._v = value

    def _room(self, key_states: Tensor, value_states: Tensor) -> None:
        """Buffers that fit the batch and ``n`` plus the new positions; the filled part copied over."""
        new = key_states.shape[-2]
        k = self._k
        if k is not None and k.dim() == 4 and k.shape[-2] >= self._n + new and k.shape[:2] == key_states.shape[:2]:
            return
        if k is not None and k.dim() == 4 and self._n and k.shape[:2] != key_states.shape[:2]:
            raise ValueError(f"PreallocatedLayer.update: {tuple(key_states.shape[:2])} (batch, heads) of new states "
                             f"for a cache of {tuple(k.shape[:2])}")
        cap = self._n + new + self.chunk
        bufs = []
        for old, states in ((self._k, key_states), (self._v, value_states)):
            buf = states.new_empty(*states.shape[:2], cap, states.shape[-1])
            if self._n:
                buf[:, :, :self._n] = old[:, :, :self._n]
            bufs.append(buf)
        self._k, self._v = bufs  # the buffers themselves, not the setters: n stays

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._room(key_states, value_states)
        n, new = self._n, key_states.shape[-2]
        self._k[:, :, n:n + new] = key_states
        self._v[:, :, n:n + new] = value_states
        self._n = n + new
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"PreallocatedLayer.crop: `tokens_to_remove` is a negative count of tokens "
                             f"(transformers 5), got {tokens_to_remove}")
        if self.is_initialized:
            self._n = max(self._n + tokens_to_remove, 0)

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep rows ``indices`` (in that order). Where every kept row moves to a position at or before
        its own (the order of :func:`fill_from_end`, or any ascending selection), the rows are moved in
        place, only those whose position changes; otherwise transformers' index copy."""
        if self.get_seq_length() == 0:
            return
        idx = indices.tolist()
        if len(set(idx)) != len(idx) or any(j < i for i, j in enumerate(idx)):
            super().batch_select_indices(indices)
            return
        n = self._n
        for i, j in enumerate(idx):  # reads row j before any write reaches it: j >= i
            if i != j:
                self._k[i, :, :n] = self._k[j, :, :n]
                self._v[i, :, :n] = self._v[j, :, :n]
        self._k, self._v = self._k[:len(idx)], self._v[:len(idx)]


class PreallocatedCache(DynamicCache):
    """``DynamicCache(config=config)`` with every full-attention layer a :class:`PreallocatedLayer`
    (room for ``chunk`` more tokens at a time); sliding-window layers as transformers makes them."""

    def __init__(self, config, chunk: int = 256):
        super().__init__(config=config)
        self.layers = [PreallocatedLayer(chunk) if type(layer) is DynamicLayer else layer for layer in self.layers]


def fill_from_end(rows: int, kept: Sequence[int]) -> list[int]:
    """The order in which the ``kept`` rows of a batch of ``rows`` go on: a kept row keeps its position
    when that position is still in the smaller batch; the holes there are filled with the kept rows
    beyond it, in order. Each finished row costs at most one moved row (an ascending selection moves
    every row after the first finished one)."""
    kept = sorted(kept)
    if len(set(kept)) != len(kept) or (kept and not 0 <= kept[0] <= kept[-1] < rows):
        raise ValueError(f"fill_from_end: `kept` must be distinct rows of 0..{rows - 1}, got {kept}")
    n = len(kept)
    tail = iter(j for j in kept if j >= n)
    inside = set(j for j in kept if j < n)
    return [i if i in inside else next(tail) for i in range(n)]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
