from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def expert_loss_ref(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Eager twin of :func:`doe_ext.ops.expert_loss` (DoE eq. 4): ``F.cross_entropy`` for int64 labels
    (0, not NaN, when every row is ignored), ``KL(t || softmax(logits))`` for float targets."""
    K = logits.shape[-1]
    x = logits.reshape(-1, K)
    if not target.is_floating_point():
        y = target.reshape(-1)
        rows = F.cross_entropy(x, y, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
        kept = (y != ignore_index).sum()
    else:
        t = target.reshape(-1, K)
        t = (1 - label_smoothing) * t + label_smoothing / K
        logp = torch.log_softmax(x, dim=-1)
        rows = (torch.xlogy(t, t) - t * logp).sum(-1)
        kept = torch.tensor(x.shape[0], device=x.device)
    if reduction == "none":
        return rows.reshape(logits.shape[:-1])
    total = rows.sum()
    return total / kept.clamp(min=1) if reduction == "mean" else total
