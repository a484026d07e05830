"""Routing and composition, shared by DMoE and PRAG.

A router maps a query to the best experts with their scores, best first: ``(query, k) -> [(id,
score), ...]`` (the bank's BM25 is :meth:`doe_ext.dmoe.bank.ExpertBank.search`). How the ``k``
experts it returns combine is the composition (docs/design.md#dmoe):

- ``"sum"``: ``theta + sum_e delta_e``, the DMoE paper's eq. 6 (weights 1);
- ``"mean"``: weights ``1 / k``;
- ``"score"``: weights ``softmax(scores / temperature)``, summing to one;
- ``"top1"``: the best expert alone (weight 1).

Each expert is trained alone at unit weight, so ``"sum"`` over ``k`` experts scales the update by up to
``k``; the three others keep the total weight at one.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

Router = Callable[[str, int], Sequence[tuple[str, float]]]
COMPOSITIONS = ("sum", "mean", "score", "top1")
# The default, chosen on the dev split (benchmarks/results/history.md, "DMoE recipes"): every normalised mode kept
# F1 near closed book while "sum" fell far below it; on the default recipe's bank, "score" at
# temperature 1 matched top-1 (EM 0.153) where temperature 3 fell to 0.083 and "mean" to 0.
DEFAULT_COMPOSE, DEFAULT_TEMPERATURE = "score", 1.0


def check_composition(compose: str, temperature: float) -> None:
    if compose not in COMPOSITIONS:
        raise ValueError(f"dmoe: `compose` must be one of {COMPOSITIONS}, got {compose!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"dmoe: `temperature` must be > 0, got {temperature!r}")


def compose(hits: Sequence[tuple[str, float]], mode: str = "sum", temperature: float = 1.0) -> list[tuple[str, float]]:
    """The weighted set ``[(id, weight), ...]`` of a router's ``hits`` under composition ``mode``."""
    hits = list(hits)
    if not hits:
        return []
    if mode == "sum":
        return [(e, 1.0) for e, _ in hits]
    if mode == "mean":
        return [(e, 1.0 / len(hits)) for e, _ in hits]
    if mode == "top1":
        return [(hits[0][0], 1.0)]
    if mode == "score":
        top = max(s for _, s in hits)
        w = [math.exp((s - top) / temperature) for _, s in hits]
        total = sum(w)
        return [(e, x / total) for (e, _), x in zip(hits, w)]
    raise ValueError(f"dmoe: `compose` must be one of {COMPOSITIONS}, got {mode!r}")


def fixed(ids: Sequence[str]) -> Router:
    """A router that returns ``ids`` (score 1 each) whatever the query: an oracle that knows a question's document."""
    hits = [(i, 1.0) for i in ids]
    return lambda query, k: hits[:k]
