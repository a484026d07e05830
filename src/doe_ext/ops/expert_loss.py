"""The expert-label loss L_expert (DoE eq. 4, App. A.5): router logits against Stage-1 topic labels."""
from __future__ import annotations

import torch
from torch import Tensor

from doe_ext.ops._checks import check_float, check_tensors, cxx_checks
from doe_ext.ops._double import differentiable, twin_grads
from doe_ext.reference import expert_loss_ref

_ops = torch.ops.doe_ext


def expert_loss(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy of the router's logits to the expert labels, fused with its gradient.

    Args:
        logits: ``[..., K]`` the router's pre-activation logits (may be non-contiguous).
        target: int64 ``[...]`` topic ids (one per token; ``ignore_index`` rows are skipped) — equal
            to ``F.cross_entropy(logits, target, ignore_index=..., label_smoothing=...)``; or a float
            ``[..., K]`` distribution per row (e.g. the document's LDA theta), giving
            ``sum(t * (log t - log_softmax(logits)))`` = ``KL(t || softmax(logits))`` with
            ``0 log 0 = 0``. ``label_smoothing`` applies to float targets too (``t' = (1-eps) t + eps/K``,
            as ``F.cross_entropy`` does for probability targets).
        ignore_index: label of rows that carry no loss (hard targets only).
        reduction: ``"mean"`` (over the non-ignored rows; over all rows for float targets, like
            ``kl_div(..., reduction="batchmean")``), ``"sum"`` or ``"none"`` (``[...]``).
        label_smoothing: in ``[0, 1]``.

    Returns:
        The loss: a scalar, or ``[...]`` for ``reduction="none"``. A batch where every row is ignored
        (or with no rows) gives 0 and a zero gradient, not NaN.

    Dtypes: float32/float64/float16/bfloat16 on the CPU (the half types in float32 math);
    float32/float16/bfloat16 on CUDA (float32 math, the loss in
    the logits' dtype). Differentiable in ``logits`` only. The forward writes the gradient of each row
    in the same pass that computes its loss (only when ``logits`` requires grad); the backward scales it.
    """
    check_tensors("expert_loss", logits=logits, target=target)
    label_smoothing = check_float("expert_loss", "label_smoothing", label_smoothing)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"expert_loss: expected `ignore_index` to be an int, got {ignore_index!r}")
    keep_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _, _ = _ops.expert_loss_fwd(logits, target, ignore_index, reduction, label_smoothing, keep_grad)
    return loss


@torch.library.register_fake("doe_ext::expert_loss_fwd")
def _fwd_fake(logits, target, ignore_index, reduction, label_smoothing, keep_grad):
    cxx_checks("expert_loss_fwd", logits, target, ignore_index, reduction, label_smoothing, keep_grad)
    lead = logits.shape[:-1]
    loss = logits.new_empty(lead if reduction == "none" else ())
    grad = logits.new_empty(logits.shape) if keep_grad else logits.new_empty((0,))
    return loss, grad, logits.new_empty(())


@torch.library.register_fake("doe_ext::expert_loss_bwd")
def _bwd_fake(grad_loss, grad_rows, weight):
    cxx_checks("expert_loss_bwd", grad_loss, grad_rows, weight)
    return torch.empty_like(grad_rows)


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index, reduction, label_smoothing, _ = inputs
    _, grad_rows, weight = output
    ctx.save_for_backward(grad_rows, weight, logits, target)  # logits, target: for a double backward only
    ctx.options = (ignore_index, reduction, label_smoothing)
    ctx.mark_non_differentiable(grad_rows, weight)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _g_rows, _g_weight):
    grad_rows, weight, logits, target = ctx.saved_tensors
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    if differentiable():  # double backward (doe_ext.ops._double)
        grad = twin_grads(lambda x: expert_loss_ref(x, target, *ctx.options), (logits,), (grad_loss,), (True,))[0]
        return grad, None, None, None, None, None
    return _ops.expert_loss_bwd(grad_loss, grad_rows, weight), None, None, None, None, None


torch.library.register_autograd("doe_ext::expert_loss_fwd", _backward, setup_context=_setup_context)
