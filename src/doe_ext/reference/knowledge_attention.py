from __future__ import annotations

import torch
from torch import Tensor


def knowledge_attention_ref(
    q: Tensor,
    z_key: Tensor,
    z_value: Tensor,
    residual: Tensor | None = None,
    scale: float | None = None,
    return_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Eager twin of :func:`doe_ext.ops.knowledge_attention` (DoE eq. 1-3)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    probs = torch.softmax((q @ z_key.T) * scale, dim=-1)  # (..., K)
    out = probs @ z_value  # (..., dv)
    if residual is not None:
        out = out + residual
    return (out, probs.detach()) if return_probs else out
