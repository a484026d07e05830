"""Decoding steps through :func:`doe_ext.ops.decode_linear`: every ``nn.Linear`` of a model streams its
weight once per step instead of running ATen's one-row GEMM (a third of the bandwidth on the CPU).

Which layers stream is per-call state, and reaches them as any per-call state does here: through a
scope (:mod:`doe_ext.nn.scope`) that :func:`streaming_linears` opens around the block."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn.functional as F
from torch import Tensor, nn

from doe_ext.nn.scope import Scope
from doe_ext.ops import decode_linear

STREAMING: Scope[frozenset[int]] = Scope("streaming_linears")  # ids of the layers that stream now


class StreamingLinear(nn.Linear):
    """An ``nn.Linear`` that computes with :func:`decode_linear` inside a :func:`streaming_linears`
    block that names it, and as ``nn.Linear`` everywhere else. A plain ``nn.Linear`` becomes one (its
    class switched in place) the first time a block names it: the same parameters, state dict and
    outputs outside a block."""

    def forward(self, x: Tensor) -> Tensor:
        on = STREAMING.get()
        if on is not None and id(self) in on:
            return decode_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def is_plain_linear(m: nn.Module) -> bool:
    """Exactly ``nn.Linear``, or one :func:`streaming_linears` switched (subclasses and wrappers such as
    quantised or LoRA layers keep their own forward)."""
    return type(m) in (nn.Linear, StreamingLinear)


def plain_linears(model: nn.Module) -> list[nn.Linear]:
    """The layers of ``model`` that :func:`streaming_linears` switches (:func:`is_plain_linear`)."""
    return [m for m in model.modules() if is_plain_linear(m)]


@contextlib.contextmanager
def streaming_linears(model: nn.Module | list[nn.Linear]) -> Iterator[int]:
    """Inside the block, every plain ``nn.Linear`` of ``model`` (:func:`plain_linears`; or the list of
    layers it returned, kept by a caller that enters the block at every step) computes with
    :func:`decode_linear`; yields how many layers the block added to those streaming already (an
    enclosing block's stay). For decoding steps (a few rows per call): larger inputs reach the same ATen
    GEMM as ``F.linear`` inside the op. Outputs agree with ``F.linear`` to float rounding, not bitwise.
    Blocks nest, and each thread sees its own."""
    layers = plain_linears(model) if isinstance(model, nn.Module) else model
    outer = STREAMING.get() or frozenset()
    new = [m for m in layers if id(m) not in outer and is_plain_linear(m)]
    for layer in new:
        if type(layer) is nn.Linear:
            layer.__class__ = StreamingLinear
    with STREAMING(outer | {id(m) for m in new}):
        yield len(new)
