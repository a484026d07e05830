"""LoRA merge (DMoE §3.2, eq. 6): bake a weighted set of LoRA experts into a weight."""
from __future__ import annotations

import torch
from torch import Tensor

from doe_ext.ops._checks import check_tensors, cxx_checks
from doe_ext.ops._double import differentiable, twin_grads
from doe_ext.reference import lora_merge_ref

_ops = torch.ops.doe_ext


def lora_merge(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scales: Tensor) -> Tensor:
    """``weight + sum_e scales[e] * lora_b[e] @ lora_a[e]`` (PEFT's layout), in one pass over ``weight``.

    Args:
        weight: ``[out, in]`` base weight (not modified).
        lora_a: ``[E, r, in]`` the selected experts' A matrices.
        lora_b: ``[E, out, r]`` their B matrices.
        scales: ``[E]`` per-expert scale (PEFT's ``alpha / r`` times any gate weight).

    Returns:
        ``[out, in]``, a new tensor.

    Computed as one GEMM ``weight + C @ lora_a.view(E*r, in)`` with ``C[o, e*r+q] = scales[e] *
    lora_b[e, o, q]``: the sum over experts is the GEMM's inner dimension, so ``weight`` is read
    and written once. Differentiable in all four inputs. Dtypes: float32/float64/float16/bfloat16
    on the CPU (ATen's GEMMs, float32 accumulation); float32/float16/bfloat16 on CUDA.
    """
    check_tensors("lora_merge", weight=weight, lora_a=lora_a, lora_b=lora_b, scales=scales)
    return _ops.lora_merge(weight, lora_a, lora_b, scales)


def lora_merge_(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scales: Tensor) -> Tensor:
    """In-place :func:`lora_merge` (no autograd): ``weight += sum_e scales[e] * lora_b[e] @ lora_a[e]``.

    For export (baking experts into a checkpoint). Returns ``weight``. Runs under ``no_grad``:
    ``weight`` may be a parameter.
    """
    check_tensors("lora_merge_", weight=weight, lora_a=lora_a, lora_b=lora_b, scales=scales)
    with torch.no_grad():
        _ops.lora_merge_(weight, lora_a, lora_b, scales)
    return weight


@torch.library.register_fake("doe_ext::lora_merge")
def _merge_fake(weight, lora_a, lora_b, scales):
    cxx_checks("lora_merge", weight, lora_a, lora_b, scales)
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("doe_ext::lora_merge_")
def _merge_inplace_fake(weight, lora_a, lora_b, scales):
    cxx_checks("lora_merge_", weight, lora_a, lora_b, scales)


@torch.library.register_fake("doe_ext::lora_merge_bwd")
def _bwd_fake(grad_out, lora_a, lora_b, scales):
    cxx_checks("lora_merge_bwd", grad_out, lora_a, lora_b, scales)
    return (torch.empty_like(lora_a, memory_format=torch.contiguous_format),
            torch.empty_like(lora_b, memory_format=torch.contiguous_format), torch.empty_like(scales))


def _setup_context(ctx, inputs, output):
    _, lora_a, lora_b, scales = inputs
    ctx.save_for_backward(lora_a, lora_b, scales)


def _backward(ctx, grad_out):
    lora_a, lora_b, scales = ctx.saved_tensors
    grad_a = grad_b = grad_s = None
    if differentiable():  # double backward (doe_ext.ops._double); weight's gradient is grad_out itself
        grad_a, grad_b, grad_s = twin_grads(lambda a, b, s: lora_merge_ref(torch.zeros_like(grad_out), a, b, s),
                                            (lora_a, lora_b, scales), (grad_out,), ctx.needs_input_grad[1:])
    elif any(ctx.needs_input_grad[1:]):
        grad_a, grad_b, grad_s = _ops.lora_merge_bwd(grad_out.contiguous(), lora_a, lora_b, scales)
    return grad_out if ctx.needs_input_grad[0] else None, grad_a, grad_b, grad_s


torch.library.register_autograd("doe_ext::lora_merge", _backward, setup_context=_setup_context)
