"""Mixed-batch multi-LoRA linear (DMoE §3.2 eq. 6, §5.3.1): every token through its own LoRA experts."""
from __future__ import annotations

import torch
from torch import Tensor

from doe_ext.ops._checks import check_tensors, cxx_checks
from doe_ext.ops._double import differentiable, twin_grads
from doe_ext.reference import multi_lora_linear_ref

_ops = torch.ops.doe_ext


def multi_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    indices: Tensor,
    scales: Tensor,
) -> Tensor:
    """``x @ weight.T + bias + sum_j scales[:, j] * lora_b[i_j] @ (lora_a[i_j] @ x)`` per token.

    Args:
        x: ``[T, in]`` tokens (rows may be strided).
        weight: ``[out, in]`` base weight; never modified (no merge/unmerge, so no drift).
        bias: ``[out]`` or None.
        lora_a: ``[N, r, in]`` the bank's A matrices (PEFT layout); any ``N``, ``r``, ``in``.
        lora_b: ``[N, out, r]`` the bank's B matrices.
        indices: int64 ``[T, k]``: token ``t``'s experts, ``-1`` for an empty slot. Tokens may use
            different experts (a mixed batch); the same expert may appear in several slots.
        scales: ``[T, k]`` per-slot scale (PEFT's ``alpha / r`` times a gate weight, say);
            ignored at empty slots.

    Returns:
        ``[T, out]``.

    Differentiable in ``x``, ``weight``, ``bias``, ``lora_a``, ``lora_b`` and ``scales``; the LoRA
    gradients are dense over the bank (zero for experts no token used), so many experts train in
    one batch. On the CPU the (token, slot) pairs are grouped by expert (a counting sort) and each
    expert's A/B meet its tokens in cache; the base GEMM is ATen's. An index out of range raises
    ``RuntimeError`` naming ``indices``, its value and position, on both devices, before anything is
    computed (on CUDA: one host sync for the indices' range). Dtypes: float32/float64/float16/bfloat16 on the CPU
    (the half types in float32 math on the experts used); float32/float16/bfloat16 on CUDA (float32
    accumulation).
    """
    check_tensors("multi_lora_linear", ("bias",), x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b,
                  indices=indices, scales=scales)
    out, _ = _ops.multi_lora_linear_fwd(x, weight, bias, lora_a, lora_b, indices, scales)
    return out


def _xa_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.register_fake("doe_ext::multi_lora_linear_fwd")
def _fwd_fake(x, weight, bias, lora_a, lora_b, indices, scales):
    cxx_checks("multi_lora_linear_fwd", x, weight, bias, lora_a, lora_b, indices, scales)
    T, k, r = x.shape[0], indices.shape[1], lora_a.shape[1]
    return x.new_empty((T, weight.shape[0])), x.new_empty((T, k, r), dtype=_xa_dtype(x.dtype))


@torch.library.register_fake("doe_ext::multi_lora_linear_bwd")
def _bwd_fake(grad_out, x, weight, lora_a, lora_b, indices, scales, xa, need_weight_grad, need_lora_grad):
    cxx_checks("multi_lora_linear_bwd", grad_out, x, weight, lora_a, lora_b, indices, scales, xa, need_weight_grad,
               need_lora_grad)
    def none():
        return x.new_empty((0,))

    cont = torch.contiguous_format
    grad_x = x.new_empty(x.shape)
    if need_weight_grad:
        grad_w, grad_b = torch.empty_like(weight, memory_format=cont), x.new_empty((weight.shape[0],))
    else:
        grad_w, grad_b = none(), none()
    if need_lora_grad:
        grads = (torch.empty_like(lora_a, memory_format=cont), torch.empty_like(lora_b, memory_format=cont),
                 torch.empty_like(scales, memory_format=cont))
    else:
        grads = (none(), none(), none())
    return (grad_x, grad_w, grad_b, *grads)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, indices, scales = inputs
    _, xa = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, indices, scales, xa, bias)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(xa)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_xa):
    if grad_out is None:
        return (None,) * 7
    x, weight, lora_a, lora_b, indices, scales, xa, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    if differentiable():  # double backward (doe_ext.ops._double)
        return tuple(twin_grads(multi_lora_linear_ref, (x, weight, bias, lora_a, lora_b, indices, scales), (grad_out,),
                                need))
    need_weight = need[1] or (ctx.has_bias and need[2])
    need_lora = need[3] or need[4] or need[6]
    gx, gw, gb, ga, gbb, gs = _ops.multi_lora_linear_bwd(grad_out.contiguous(), x, weight, lora_a, lora_b,
                                                         indices, scales, xa, need_weight, need_lora)
    return (gx if need[0] else None, gw if need[1] else None, gb if ctx.has_bias and need[2] else None,
            ga if need[3] else None, gbb if need[4] else None, None, gs if need[6] else None)


torch.library.register_autograd("doe_ext::multi_lora_linear_fwd", _backward, setup_context=_setup_context)
