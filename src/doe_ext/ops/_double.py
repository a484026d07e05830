"""Double backward for the fused ops. A fused backward op is not itself differentiable; when a
backward runs with ``create_graph=True`` (gradient penalties, MAML, Hessian-vector products) the
autograd formulas take this path instead: the gradient of the op's plain-PyTorch twin
(:mod:`doe_ext.reference`), built with ``create_graph=True``, so it is differentiable to any order
and equal to the fused gradient (the twins are the ops' test oracles). The fused backward stays the
path of every ordinary ``backward()`` and of ``torch.compile``, which differentiate once."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def differentiable() -> bool:
    """True when this backward is itself being recorded (``create_graph=True``)."""
    return torch.is_grad_enabled()


def twin_grads(twin: Callable[..., Tensor | tuple[Tensor, ...]], inputs: Sequence, grad_outputs: Sequence,
               needs: Sequence[bool]) -> list[Tensor | None]:
    """``d twin(*inputs) / d inputs`` against ``grad_outputs`` (None: that output sends none), for
    the tensor inputs with ``needs[i]`` that require grad, with ``create_graph=True``; None elsewhere."""
    wanted = [i for i, x in enumerate(inputs)
              if needs[i] and isinstance(x, Tensor) and x.requires_grad]
    out: list[Tensor | None] = [None] * len(inputs)
    if not wanted:
        return out
    with torch.enable_grad():
        outs = twin(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
    if not pairs:
        return out
    grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                create_graph=True, allow_unused=True)
    for i, g in zip(wanted, grads):
        out[i] = g
    return out
