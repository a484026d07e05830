from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def multi_lora_linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                          indices: Tensor, scales: Tensor) -> Tensor:
    """Eager twin of :func:`doe_ext.ops.multi_lora_linear`: gather each slot's A and B, then einsum.

    Materialises ``[T, k, r, in]`` and ``[T, k, out, r]``: an oracle for tests, not for speed."""
    used = indices >= 0
    idx = indices.clamp(min=0)
    xa = torch.einsum("tkri,ti->tkr", lora_a[idx], x)  # (T, k, r)
    delta = torch.einsum("tkor,tkr->tko", lora_b[idx], xa)  # (T, k, out)
    delta = delta * torch.where(used, scales, 0).unsqueeze(-1)
    return F.linear(x, weight, bias) + delta.sum(1)


def multi_lora_linear_per_expert(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                                 indices: Tensor, scales: Tensor) -> Tensor:
    """The eager way of mixed batches (PEFT's ``_mixed_batch_forward``): one masked pass per expert
    in use, each on the rows that use it. The benchmark's baseline; reads ``indices`` on the host."""
    y = F.linear(x, weight, bias)
    for e in indices.unique().tolist():
        if e < 0:
            continue
        sel = indices == e  # (T, k)
        rows = sel.any(1).nonzero().squeeze(1)
        s = torch.where(sel, scales, 0).sum(1)[rows]  # an expert twice in a row: scales add up
        # PEFT writes `result[rows] += ...`; index_add_ is the same sum with a cheaper backward
        y.index_add_(0, rows, (x[rows] @ lora_a[e].T @ lora_b[e].T) * s.unsqueeze(1))
    return y
