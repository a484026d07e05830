"""A decoding step's linear layer: ``x @ weight.T + bias`` for a few rows, the weight read once."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from doe_ext.ops._checks import check_tensors, cxx_checks

_ops = torch.ops.doe_ext


def decode_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for the few rows of a decoding step, at the memory bandwidth.

    Args:
        x: ``[..., in]``; the rows are ``x.reshape(-1, in)``.
        weight: ``[out, in]`` (``nn.Linear``'s layout).
        bias: ``[out]`` or None.

    Returns:
        ``[..., out]``.

    With one token per sequence, every linear layer of a language model is a matrix-vector product,
    bound by reading the weight; ATen's CPU GEMM reads it at about a third of the bandwidth there
    (``benchmarks/results/history.md``). The CPU kernel streams each weight row once and forms its dot
    product with every input row from L1, for up to 8 rows (at 1-3 rows, four weight rows per pass
    from four quarters of a thread's range: a core keeps four streams in flight, and each output is
    the same sum as the row's alone, bit for bit); more rows are a GEMM (compute-bound), which the op
    leaves to ATen. On CUDA the op is cuBLAS's GEMM. Sums run in another order than ATen's: outputs agree to float rounding, not
    bitwise. Differentiable in all three inputs (the gradients are ATen GEMMs). Dtypes:
    float32/float64/float16/bfloat16 on the CPU (half types in float32), float32/float16/bfloat16 on CUDA.
    """
    check_tensors("decode_linear", optional=("bias",), x=x, weight=weight, bias=bias)
    if x.dim() == 0:
        raise ValueError("decode_linear: expected `x` of shape [..., in], got a 0-D tensor")
    rows = math.prod(x.shape[:-1])  # not reshape(-1, in): in may be 0
    x2 = x.reshape(rows, x.shape[-1])
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias))):
        out = _ops.decode_linear(x2, weight, bias)
    else:  # nothing to record: straight to the kernel, past the Python autograd wrapper (~15 us a call)
        with torch._C._AutoDispatchBelowAutograd():
            out = _ops.decode_linear(x2, weight, bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@torch.library.register_fake("doe_ext::decode_linear")
def _fake(x, weight, bias):
    cxx_checks("decode_linear", x, weight, bias)
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    grad_x = grad_out @ weight if need_x else None
    grad_w = grad_out.t() @ x if need_w else None
    grad_b = grad_out.sum(0) if need_b and ctx.has_bias else None
    return grad_x, grad_w, grad_b


torch.library.register_autograd("doe_ext::decode_linear", _backward, setup_context=_setup_context)


# The lean decoding step's ops (doe_ext.nn.LeanDecoder; CPU, inference only): shapes for torch.compile
# and the meta device, after the same C++ checks as the kernels.
@torch.library.register_fake("doe_ext::lean_qkv")
def _fake_lean_qkv(h, norm_weight, eps, wq, bq, wk, bk, wv, bv, cos, sin):
    cxx_checks("lean_qkv", h, norm_weight, eps, wq, bq, wk, bk, wv, bv, cos, sin)
    R, D = h.shape[0], cos.shape[1]
    return (h.new_empty(R, wq.shape[0] // D, 1, D), h.new_empty(R, wk.shape[0] // D, 1, D),
            h.new_empty(R, wv.shape[0] // D, 1, D))


@torch.library.register_fake("doe_ext::lean_attention")
def _fake_lean_attention(h, q, k, v, mask, scale, wo, bo):
    cxx_checks("lean_attention", h, q, k, v, mask, scale, wo, bo)
    return torch.empty_like(h, memory_format=torch.contiguous_format)


@torch.library.register_fake("doe_ext::lean_mlp")
def _fake_lean_mlp(h, norm_weight, eps, w_gate, b_gate, w_up, b_up, w_down, b_down):
    cxx_checks("lean_mlp", h, norm_weight, eps, w_gate, b_gate, w_up, b_up, w_down, b_down)
    return torch.empty_like(h, memory_format=torch.contiguous_format)
