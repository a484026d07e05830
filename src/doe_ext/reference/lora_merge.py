from __future__ import annotations

import torch
from torch import Tensor


def lora_merge_ref(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scales: Tensor) -> Tensor:
    """Eager twin of :func:`doe_ext.ops.lora_merge`: ``W + einsum`` over the experts."""
    return weight + torch.einsum("e,eor,eri->oi", scales, lora_b, lora_a)  # (out, in)
