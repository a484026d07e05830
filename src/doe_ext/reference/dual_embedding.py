from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dual_embedding_ref(
    token_ids: Tensor,
    topic_ids: Tensor,
    token_weight: Tensor,
    topic_weight: Tensor,
    padding_idx: int | None = None,
) -> Tensor:
    """Eager twin of :func:`doe_ext.ops.dual_embedding` (DoE Algorithm 1: index, index, cat)."""
    h_tok = F.embedding(token_ids, token_weight, padding_idx=padding_idx)  # (..., d)
    labeled = (topic_ids >= 0).unsqueeze(-1)
    h_know = torch.where(labeled, topic_weight[topic_ids.clamp(min=0)], 0)  # (..., dk), 0 where -1
    return torch.cat([h_tok, h_know], dim=-1)  # (..., d + dk)
