"""Expert LoRA on the last MLP's projections, PEFT-style: each projection is wrapped (kept as
``base_layer``) and swapped in with ``setattr``; nothing is monkeypatched.

A wrapped projection is a function of its inputs plus the routing set for exactly one call by
:func:`use_experts` (a context variable, so concurrent threads and nested calls do not see each
other's experts). Outside such a call it is its base layer, bit for bit.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from doe_ext.dmoe.base import LastLayer, linear_weight, unwrap
from doe_ext.ops import multi_lora_linear


@dataclass(frozen=True)
class LoRAConfig:
    """An expert's shape (PEFT's convention: ``delta = (alpha / rank) * B @ A``).

    Args:
        rank: LoRA rank ``r`` (DMoE §4.1.3: 4).
        alpha: LoRA scaling numerator (DMoE: 16).
    """

    rank: int = 4
    alpha: float = 16.0

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"LoRAConfig: `rank` must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig: `alpha` must be > 0, got {self.alpha!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class ExpertSet:
    """Stacked LoRA factors of ``N`` experts: per projection ``a [N, r, in]`` and ``b [N, out, r]``."""

    a: dict[str, Tensor]
    b: dict[str, Tensor]

    def to(self, device) -> "ExpertSet":
        return ExpertSet({n: t.to(device) for n, t in self.a.items()}, {n: t.to(device) for n, t in self.b.items()})

    @property
    def num_experts(self) -> int:
        return next(iter(self.a.values())).shape[0]


@dataclass
class Routing:
    """Which experts each row uses in one call.

    ``indices`` int64 ``[R, k]`` into the ExpertSet (``-1``: empty slot) and ``scales [R, k]``. ``R`` is
    either the number of rows the projection sees (tokens) or the batch size ``B`` of a ``[B, T, in]``
    input (one set per sequence, shared by its tokens).
    """

    experts: ExpertSet
    indices: Tensor
    scales: Tensor


_ROUTING: contextvars.ContextVar[Routing | None] = contextvars.ContextVar("doe_ext_dmoe_routing", default=None)


@contextlib.contextmanager
def use_experts(routing: Routing | None):
    """Run the wrapped projections with ``routing`` for the calls made inside the block."""
    token = _ROUTING.set(routing)
    try:
        yield
    finally:
        _ROUTING.reset(token)


class ExpertLinear(nn.Module):
    """A projection of the last MLP with per-row LoRA experts (``multi_lora_linear``)."""

    def __init__(self, base_layer: nn.Module, name: str):
        super().__init__()
        self.base_layer, self.name = base_layer, name

    def forward(self, x: Tensor) -> Tensor:
        routing = _ROUTING.get()
        if routing is None or self.name not in routing.experts.a:
            return self.base_layer(x)
        idx, scales = routing.indices, routing.scales
        x2 = x.reshape(-1, x.shape[-1])
        if idx.shape[0] != x2.shape[0]:  # one set per sequence of a [B, T, in] input
            if x.dim() != 3 or idx.shape[0] != x.shape[0]:
                raise ValueError(f"dmoe: routing has {idx.shape[0]} rows for an input of shape {tuple(x.shape)}")
            idx = idx.repeat_interleave(x.shape[1], 0)
            scales = scales.repeat_interleave(x.shape[1], 0)
        inner = unwrap(self.base_layer)  # another variant's wrapper may sit inside (unused in this call)
        y = multi_lora_linear(x2, linear_weight(inner), getattr(inner, "bias", None),
                              routing.experts.a[self.name], routing.experts.b[self.name], idx,
                              scales.to(x.dtype))
        return y.reshape(*x.shape[:-1], y.shape[-1])


def attach(last: LastLayer) -> None:
    """Wrap the last MLP's projections in :class:`ExpertLinear` (idempotent)."""
    for name, module in last.projections().items():
        if not (isinstance(module, ExpertLinear) and module.name == name):
            setattr(last.mlp, name, ExpertLinear(module, name))


def detach(last: LastLayer) -> None:
    """Put the original projections back."""
    for name, module in last.projections().items():
        if isinstance(module, ExpertLinear):
            setattr(last.mlp, name, module.base_layer)


def init_expert(shapes: dict[str, tuple[int, int]], cfg: LoRAConfig, generator: torch.Generator) -> dict[str, Tensor]:
    """A fresh expert as PEFT initialises LoRA: ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (kaiming-uniform with
    a = sqrt(5)), ``B = 0``, so it starts as the base model. Keys ``"<proj>.lora_a"`` / ``"<proj>.lora_b"``."""
    out = {}
    for name, (o, i) in shapes.items():
        out[f"{name}.lora_a"] = (torch.rand(cfg.rank, i, generator=generator) * 2 - 1) / i ** 0.5
        out[f"{name}.lora_b"] = torch.zeros(o, cfg.rank)
    return out


def stack(experts: list[dict[str, Tensor]], names: tuple[str, ...]) -> ExpertSet:
    """Expert tensor dicts -> one :class:`ExpertSet` (projection factors stacked in the given order)."""
    return ExpertSet(a={n: torch.stack([e[f"{n}.lora_a"] for e in experts]) for n in names},
                     b={n: torch.stack([e[f"{n}.lora_b"] for e in experts]) for n in names})
