from __future__ import annotations

import torch
from torch import Tensor, nn

from doe_ext.nn.projection import is_projection, linear_weight
from doe_ext.ops import multi_lora_linear
from doe_ext.reference import multi_lora_linear_ref


def lora_rows(base: nn.Module, x: Tensor, lora_a: Tensor, lora_b: Tensor, indices: Tensor, scales: Tensor,
              reference: bool = False) -> Tensor:
    """``base(x)`` plus each row's LoRA experts (``multi_lora_linear``): ``base`` a projection
    (``nn.Linear`` or GPT-2's ``Conv1D``), ``x [..., in]``, ``indices`` / ``scales [rows, k]`` for the rows
    of ``x.reshape(-1, in)`` -> ``[..., out]``. What :class:`MultiLoRALinear` and DMoE's expert
    projections (:class:`doe_ext.dmoe.experts.ExpertLinear`) both compute."""
    x2 = x.reshape(-1, x.shape[-1])
    apply = multi_lora_linear_ref if reference else multi_lora_linear
    y = apply(x2, linear_weight(base), getattr(base, "bias", None), lora_a, lora_b, indices, scales.to(x.dtype))
    return y.reshape(*x.shape[:-1], y.shape[-1])


class MultiLoRALinear(nn.Module):
    """A linear layer with a bank of LoRA experts, each token through its own set (DMoE §3.2 eq. 6).

    Wraps an existing projection (``nn.Linear`` or GPT-2's ``Conv1D``, kept unchanged as ``base_layer``,
    PEFT's convention) and owns the bank ``lora_a [N, r, in]``, ``lora_b [N, out, r]``.
    ``forward(x, indices, scales)`` adds ``scales[..., j] * B_i (A_i x)`` for each non-empty slot
    ``i = indices[..., j]``; the base weight is never modified, so experts can change from token to
    token (mixed batches) and train together. DMoE's experts use the same computation
    (:func:`lora_rows`) with the bank of the routed documents.

    Args:
        base: the projection to wrap.
        bank_a: ``[N, r, in]`` A matrices (taken as the parameter if already one, else copied in).
        bank_b: ``[N, out, r]`` B matrices (zeros in a fresh LoRA: the layer starts as ``base``).
        reference: run the plain-PyTorch twin instead of the fused op.
    """

    def __init__(self, base: nn.Module, bank_a: Tensor, bank_b: Tensor, reference: bool = False):
        super().__init__()
        if not is_projection(base):
            raise TypeError(f"MultiLoRALinear: expected `base` to be an nn.Linear or Conv1D, got {type(base).__name__}")
        out_f, in_f = linear_weight(base).shape
        if bank_a.dim() != 3 or bank_a.shape[2] != in_f:
            raise ValueError(f"MultiLoRALinear: expected `bank_a` of shape [N, r, {in_f}], got {tuple(bank_a.shape)}")
        N, r = bank_a.shape[:2]
        if tuple(bank_b.shape) != (N, out_f, r):
            raise ValueError(f"MultiLoRALinear: expected `bank_b` of shape [{N}, {out_f}, {r}], got {tuple(bank_b.shape)}")
        self.base_layer = base
        self.lora_a = bank_a if isinstance(bank_a, nn.Parameter) else nn.Parameter(bank_a.detach().clone())
        self.lora_b = bank_b if isinstance(bank_b, nn.Parameter) else nn.Parameter(bank_b.detach().clone())
        self.reference = reference

    @property
    def num_experts(self) -> int:
        return self.lora_a.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]

    def forward(self, x: Tensor, indices: Tensor, scales: Tensor | None = None) -> Tensor:
        """``x [..., in]``, ``indices`` int64 ``[..., k]`` (-1: empty), ``scales [..., k]`` (None: 1)
        -> ``[..., out]``."""
        rows = x.numel() // x.shape[-1]
        idx2 = indices.reshape(rows, -1)
        s2 = torch.ones(idx2.shape, dtype=x.dtype, device=x.device) if scales is None else scales.reshape(idx2.shape)
        return lora_rows(self.base_layer, x, self.lora_a, self.lora_b, idx2, s2, self.reference)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, rank={self.rank}"
