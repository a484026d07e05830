"""Knowledge attention (DoE §3.4, eq. 1-3): tokens attend over the K knowledge blocks."""
from __future__ import annotations

import torch
from torch import Tensor

from doe_ext.ops._checks import check_float, check_tensors, cxx_checks
from doe_ext.ops._double import differentiable, twin_grads
from doe_ext.reference import knowledge_attention_ref

_ops = torch.ops.doe_ext


def knowledge_attention(
    q: Tensor,
    z_key: Tensor,
    z_value: Tensor,
    residual: Tensor | None = None,
    scale: float | None = None,
    return_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``residual + softmax(q @ z_key.T * scale, -1) @ z_value``, fused.

    Args:
        q: ``[..., dk]`` queries (any leading dims, may be non-contiguous).
        z_key: ``[K, dk]`` knowledge keys. In DoE ``z_key = z_value = Z``, the ``[K, d]`` knowledge state.
        z_value: ``[K, dv]`` knowledge values.
        residual: ``[..., dv]`` added to the output, or None.
        scale: score scale, ``1/sqrt(dk)`` by default.
        return_probs: also return the attention probabilities ``[..., K]`` (for analysis; they
            carry no gradient).

    Returns:
        ``out [..., dv]``, or ``(out, probs)`` with ``return_probs=True``.

    Dtypes: float32/float64/float16/bfloat16 on the CPU (the half types in float32 math);
    float32/float16/bfloat16 on CUDA (float32 accumulation).
    Differentiable in ``q``, ``z_key``, ``z_value`` and ``residual``. The forward writes no
    ``[..., K]`` tensor on CUDA (unless asked for probs): the backward rebuilds the probabilities
    from one saved log-sum-exp per row. On the CPU, when a backward will follow, the probabilities
    are kept (as eager autograd does) to spare the backward a GEMM.
    """
    check_tensors("knowledge_attention", ("residual",), q=q, z_key=z_key, z_value=z_value, residual=residual)
    scale = check_float("knowledge_attention", "scale", scale, optional=True)
    if scale is None:
        if q.dim() == 0 or q.shape[-1] == 0:
            raise ValueError(f"knowledge_attention: expected `q` of shape [..., dk] with dk >= 1 (the default scale is "
                             f"1/sqrt(dk)), got shape {list(q.shape)}")
        scale = q.shape[-1] ** -0.5
    # On the CPU the block's probabilities are at hand: keeping them for the backward spares it a
    # GEMM (the same [..., K] tensor eager autograd saves). CUDA rebuilds them from lse instead.
    keep_probs = return_probs or (
        q.device.type == "cpu" and torch.is_grad_enabled()
        and (q.requires_grad or z_key.requires_grad or z_value.requires_grad))
    out, _, probs = _ops.knowledge_attention_fwd(q, z_key, z_value, residual, float(scale), keep_probs)
    return (out, probs) if return_probs else out


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("doe_ext::knowledge_attention_fwd")
def _fwd_fake(q, z_key, z_value, residual, scale, return_probs):
    cxx_checks("knowledge_attention_fwd", q, z_key, z_value, residual, scale, return_probs)
    lead = q.shape[:-1]
    out = q.new_empty((*lead, z_value.shape[1]))
    lse = q.new_empty(lead, dtype=_lse_dtype(q.dtype))
    probs = q.new_empty((*lead, z_key.shape[0])) if return_probs else q.new_empty((0,))
    return out, lse, probs


@torch.library.register_fake("doe_ext::knowledge_attention_bwd")
def _bwd_fake(grad_out, q, z_key, z_value, lse, probs, scale):
    cxx_checks("knowledge_attention_bwd", grad_out, q, z_key, z_value, lse, probs, scale)
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(z_key), torch.empty_like(z_value)


def _setup_context(ctx, inputs, output):
    q, z_key, z_value, residual, scale, _ = inputs
    _, lse, probs = output
    ctx.save_for_backward(q, z_key, z_value, lse, probs)
    ctx.scale = scale
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(lse, probs)
    ctx.set_materialize_grads(False)  # lse and probs get no gradient: don't build zeros for them


def _backward(ctx, grad_out, _grad_lse, _grad_probs):
    q, z_key, z_value, lse, probs = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None
    if differentiable():  # double backward: the twin's gradient, differentiable (doe_ext.ops._double)
        grad_q, grad_zk, grad_zv, _ = twin_grads(lambda a, b, c, s: knowledge_attention_ref(a, b, c, scale=s),
                                                  (q, z_key, z_value, ctx.scale), (grad_out,), ctx.needs_input_grad)
    else:
        grad_q, grad_zk, grad_zv = _ops.knowledge_attention_bwd(grad_out.contiguous(), q, z_key, z_value, lse, probs,
                                                                ctx.scale)
    grad_res = grad_out if ctx.has_residual and ctx.needs_input_grad[3] else None
    return grad_q, grad_zk, grad_zv, grad_res, None, None


torch.library.register_autograd("doe_ext::knowledge_attention_fwd", _backward, setup_context=_setup_context)
