"""Dual-input embedding (DoE §3.3, Algorithm 1): each token's embedding next to its LDA topic's."""
from __future__ import annotations

import torch
from torch import Tensor

from doe_ext.ops._checks import check_tensors, cxx_checks
from doe_ext.ops._double import differentiable, twin_grads
from doe_ext.reference import dual_embedding_ref

_ops = torch.ops.doe_ext


def dual_embedding(
    token_ids: Tensor,
    topic_ids: Tensor,
    token_weight: Tensor,
    topic_weight: Tensor,
    padding_idx: int | None = None,
) -> Tensor:
    """``cat(token_weight[token_ids], topic_weight[topic_ids], -1)``, with ``topic_ids == -1`` giving zeros.

    Args:
        token_ids: int64 ``[...]`` token ids, each in ``[0, V)``.
        topic_ids: int64 ``[...]`` (same shape) Stage-1 LDA topic ids, each in ``[0, K)`` or ``-1``
            for "no label": that token's topic part is zeros and sends no gradient.
        token_weight: ``[V, d]`` token embedding table ``E_tok``.
        topic_weight: ``[K, dk]`` topic embedding table ``E_know`` (same dtype and device).
        padding_idx: as in ``nn.Embedding``: the ``token_weight`` row at this id (negative counts
            from the end) gets no gradient. The forward still returns that row.

    Returns:
        ``[..., d + dk]``.

    Dtypes: float32/float64/float16/bfloat16 on the CPU (the half types in float32 math);
    float32/float16/bfloat16 on CUDA. Differentiable in both
    tables; their gradients are dense (like ``nn.Embedding(sparse=False)``) and deterministic:
    ids are sorted (a counting sort on the CPU, a CUB radix sort on CUDA) and each table row sums
    its tokens' gradients in token order, never with atomics, so two runs give bitwise-identical
    gradients. An id out of range raises ``RuntimeError`` naming ``token_ids`` or ``topic_ids``
    and the value (on CUDA this check reads one flag back to the host).
    """
    check_tensors("dual_embedding", token_ids=token_ids, topic_ids=topic_ids, token_weight=token_weight,
                  topic_weight=topic_weight)
    if padding_idx is not None and (isinstance(padding_idx, bool) or not isinstance(padding_idx, int)):
        raise TypeError(f"dual_embedding: expected `padding_idx` to be an int or None, got {padding_idx!r}")
    if padding_idx is not None:
        V = token_weight.shape[0]
        if not -V <= padding_idx < V:
            raise ValueError(f"dual_embedding: expected `padding_idx` in [-{V}, {V}) (rows of `token_weight`), "
                             f"got {padding_idx}")
        padding_idx = padding_idx % V
    return _ops.dual_embedding_fwd(token_ids, topic_ids, token_weight, topic_weight,
                                   -1 if padding_idx is None else padding_idx)


@torch.library.register_fake("doe_ext::dual_embedding_fwd")
def _fwd_fake(token_ids, topic_ids, token_weight, topic_weight, padding_idx=-1):
    cxx_checks("dual_embedding_fwd", token_ids, topic_ids, token_weight, topic_weight, padding_idx)
    return token_weight.new_empty((*token_ids.shape, token_weight.shape[1] + topic_weight.shape[1]))


@torch.library.register_fake("doe_ext::dual_embedding_bwd")
def _bwd_fake(grad_out, token_ids, topic_ids, token_weight, topic_weight, padding_idx):
    cxx_checks("dual_embedding_bwd", grad_out, token_ids, topic_ids, token_weight, topic_weight, padding_idx)
    return torch.empty_like(token_weight, memory_format=torch.contiguous_format), torch.empty_like(
        topic_weight, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    token_ids, topic_ids, token_weight, topic_weight, *rest = inputs
    padding_idx = rest[0] if rest else -1
    # The tables are saved for their shapes and dtype only (parameters, alive anyway).
    ctx.save_for_backward(token_ids, topic_ids, token_weight, topic_weight)
    ctx.padding_idx = padding_idx


def _backward(ctx, grad_out):
    token_ids, topic_ids, token_weight, topic_weight = ctx.saved_tensors
    if differentiable():  # double backward (doe_ext.ops._double)
        pad = None if ctx.padding_idx < 0 else ctx.padding_idx
        _, _, grad_tok, grad_top = twin_grads(lambda a, b, c, d: dual_embedding_ref(a, b, c, d, padding_idx=pad),
                                              (token_ids, topic_ids, token_weight, topic_weight), (grad_out,),
                                              ctx.needs_input_grad)
        return None, None, grad_tok, grad_top, None
    grad_tok, grad_top = _ops.dual_embedding_bwd(grad_out.contiguous(), token_ids, topic_ids, token_weight,
                                                 topic_weight, ctx.padding_idx)
    return (None, None, grad_tok if ctx.needs_input_grad[2] else None,
            grad_top if ctx.needs_input_grad[3] else None, None)


torch.library.register_autograd("doe_ext::dual_embedding_fwd", _backward, setup_context=_setup_context)
