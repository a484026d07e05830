"""Decoding steps through :func:`doe_ext.ops.decode_linear`: every ``nn.Linear`` of a model streams its
weight once per step instead of running ATen's one-row GEMM (a third of the bandwidth on the CPU)."""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from torch import Tensor, nn

from doe_ext.ops import decode_linear


def _streaming_forward(layer: nn.Linear, x: Tensor) -> Tensor:
    return decode_linear(x, layer.weight, layer.bias)


def plain_linears(model: nn.Module) -> list[nn.Linear]:
    """The layers of ``model`` that :func:`streaming_linears` switches: exactly ``nn.Linear`` (subclasses
    and wrappers such as quantised or LoRA layers keep their own forward)."""
    return [m for m in model.modules() if type(m) is nn.Linear]


@contextlib.contextmanager
def streaming_linears(model: nn.Module | list[nn.Linear]) -> Iterator[int]:
    """Inside the block, every plain ``nn.Linear`` of ``model`` (:func:`plain_linears`; or the list of
    layers it returned, kept by a caller that enters the block at every step) computes with
    :func:`decode_linear`; yields how many layers were switched. For decoding steps (a few rows per
    call): larger inputs reach the same ATen GEMM as ``F.linear`` inside the op. Outputs agree with
    ``F.linear`` to float rounding, not bitwise. Nests; not thread-safe (it sets each layer's
    ``forward`` for the block)."""
    layers = plain_linears(model) if isinstance(model, nn.Module) else model
    layers = [m for m in layers if "forward" not in vars(m)]  # an enclosing block has switched the others
    for layer in layers:
        layer.forward = functools.partial(_streaming_forward, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward
