from __future__ import annotations

from torch import Tensor


def decode_linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Eager twin of :func:`doe_ext.ops.decode_linear`: ``x @ weight.T + bias``, elementwise and summed."""
    out = (x.unsqueeze(-2) * weight).sum(-1)  # [..., out]: each output a plain sum of products
    return out if bias is None else out + bias
