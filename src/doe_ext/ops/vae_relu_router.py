"""The VAE-ReLU router (DoE §3.4, App. A.3): hidden state -> latent z -> gates over the K knowledge blocks."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from doe_ext.ops._checks import check_tensors, cxx_checks
from doe_ext.ops._double import differentiable, twin_grads
from doe_ext.reference import vae_relu_router_ref

_ops = torch.ops.doe_ext


class RouterStats(NamedTuple):
    """Gate telemetry of one router call, computed inside the fused pass (no host sync).

    ``block_counts [K]`` int64: tokens whose gate k is > 0. ``zero_rows []`` int64: tokens whose every
    gate is 0 (a valid ReLU output: such a token composes no expert). ``tokens``: the token count.
    """

    block_counts: Tensor
    zero_rows: Tensor
    tokens: int

    def zero_row_share(self) -> Tensor:
        return self.zero_rows.double() / max(self.tokens, 1)

    def sparsity(self) -> Tensor:
        """Share of gates that are exactly zero."""
        return 1 - self.block_counts.sum().double() / max(self.tokens * self.block_counts.numel(), 1)


def draw_rng(device: torch.device | str) -> Tensor:
    """An int64 ``[2]`` Philox (key, stream) pair drawn from torch's current generator on ``device``
    (stays on the device: no host sync). The same ``torch.manual_seed`` gives the same pair."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


def vae_relu_router(
    h: Tensor,
    w_mu: Tensor,
    b_mu: Tensor,
    w_logvar: Tensor,
    b_logvar: Tensor,
    w_gate: Tensor,
    b_gate: Tensor,
    noise: Tensor | None = None,
    training: bool = True,
    activation: str = "relu",
    return_stats: bool = False,
    return_z: bool = False,
) -> tuple[Tensor, ...]:
    """VAE router with a ReLU (or softmax) gate, fused: returns ``(gates, logits, kl)``.

    ``mu = h @ w_mu.T + b_mu``, ``logvar = h @ w_logvar.T + b_logvar`` (one GEMM over the stacked
    weights), ``z = mu + exp(logvar / 2) * noise`` when training else ``mu``,
    ``logits = z @ w_gate.T + b_gate``, ``gates = relu(logits)`` (or ``softmax(logits, -1)``),
    ``kl = 0.5 * sum(exp(logvar) + mu**2 - 1 - logvar, -1)`` (in both modes).

    Args:
        h: ``[..., d]`` router input (any leading dims, may be non-contiguous).
        w_mu, w_logvar: ``[dz, d]`` encoder heads; b_mu, b_logvar: ``[dz]``.
        w_gate: ``[K, dz]`` gate; b_gate: ``[K]``.
        noise: ``[..., dz]`` standard-normal eps, or None to draw it: a Philox key/stream pair is
            drawn from torch's current generator on ``h``'s device (``torch.randint``, so
            ``torch.manual_seed`` makes calls repeatable), and eps is a pure function of that pair and
            the element's (row, column). The backward regenerates eps; nothing of size ``[..., dz]``
            is stored for it.
        training: reparameterise with noise (True) or use ``z = mu`` (False).
        activation: ``"relu"`` (DoE) or ``"softmax"`` (the VAE-softmax router of Table 3 (B)).
        return_stats: also return a :class:`RouterStats` (per-block activation counts, all-zero rows).
        return_z: also return the latent sample ``z [..., dz]`` (differentiable; the input of a
            decoder, App. H.3). It is a buffer the op writes anyway: asking for it costs nothing.

    Returns:
        ``gates [..., K]``, ``logits [..., K]`` (both differentiable; feed ``logits`` to
        :func:`doe_ext.ops.expert_loss`), ``kl [...]``, then ``z`` and the stats when asked.

    Dtypes: float32/float64/float16/bfloat16 on the CPU (the half types in float32 math);
    float32/float16/bfloat16 on CUDA (float32 math).
    Differentiable in ``h`` and every weight and bias. An all-zero gate row is valid; nothing divides
    by the gate sum.
    """
    check_tensors("vae_relu_router", ("noise",), h=h, w_mu=w_mu, b_mu=b_mu, w_logvar=w_logvar, b_logvar=b_logvar,
                  w_gate=w_gate, b_gate=b_gate, noise=noise)
    if not isinstance(training, bool):
        raise TypeError(f"vae_relu_router: expected `training` to be a bool, got {training!r}")
    rng = draw_rng(h.device) if training and noise is None else None
    gates, logits, kl, z, _, counts, zero_rows = _ops.vae_relu_router_fwd(
        h, w_mu, b_mu, w_logvar, b_logvar, w_gate, b_gate, noise, rng, training, activation)
    out = (gates, logits, kl)
    if return_z:
        out += (z,)
    if return_stats:
        out += (RouterStats(counts, zero_rows, math.prod(h.shape[:-1])),)
    return out


@torch.library.register_fake("doe_ext::vae_relu_router_fwd")
def _fwd_fake(h, w_mu, b_mu, w_logvar, b_logvar, w_gate, b_gate, noise, rng, training, activation):
    cxx_checks("vae_relu_router_fwd", h, w_mu, b_mu, w_logvar, b_logvar, w_gate, b_gate, noise, rng, training,
               activation)
    lead = h.shape[:-1]
    K, dz = w_gate.shape
    gates = h.new_empty((*lead, K))
    logits = h.new_empty((*lead, K))
    kl = h.new_empty(lead)
    z = h.new_empty((*lead, dz))
    mulv = h.new_empty((*lead, 2 * dz))
    counts = h.new_empty((K,), dtype=torch.int64)
    zero_rows = h.new_empty((), dtype=torch.int64)
    return gates, logits, kl, z, mulv, counts, zero_rows


@torch.library.register_fake("doe_ext::vae_relu_router_bwd")
def _bwd_fake(grad_gates, grad_logits, grad_kl, grad_z, h, w_mu, w_logvar, w_gate, mu_logvar, gates, logits, noise, rng,
              training, activation):
    cxx_checks("vae_relu_router_bwd", grad_gates, grad_logits, grad_kl, grad_z, h, w_mu, w_logvar, w_gate, mu_logvar,
               gates, logits, noise, rng, training, activation)
    dz, K = w_mu.shape[0], w_gate.shape[0]
    return (torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(w_mu),
            w_mu.new_empty((dz,)), torch.empty_like(w_logvar), w_mu.new_empty((dz,)), torch.empty_like(w_gate),
            w_gate.new_empty((K,)))


def _setup_context(ctx, inputs, output):
    h, w_mu, b_mu, w_logvar, b_logvar, w_gate, b_gate, noise, rng, training, activation = inputs
    gates, logits, _, _, mulv, counts, zero_rows = output
    # the biases: for a double backward only (parameters, alive anyway)
    ctx.save_for_backward(h, w_mu, w_logvar, w_gate, mulv, gates, logits, noise, rng, b_mu, b_logvar, b_gate)
    ctx.training, ctx.activation = training, activation
    ctx.mark_non_differentiable(mulv, counts, zero_rows)
    ctx.set_materialize_grads(False)  # absent output grads stay None: no zero tensors are built


def _backward(ctx, grad_gates, grad_logits, grad_kl, grad_z, _g_mulv, _g_counts, _g_zero):
    h, w_mu, w_logvar, w_gate, mulv, gates, logits, noise, rng, b_mu, b_logvar, b_gate = ctx.saved_tensors
    if grad_gates is None and grad_logits is None and grad_kl is None and grad_z is None:
        return (None,) * 11
    if differentiable():  # double backward (doe_ext.ops._double): the twin with the same eps
        eps = noise
        if ctx.training and eps is None:  # regenerate the op's Philox eps from its z
            with torch.no_grad():
                z = _ops.vae_relu_router_fwd(h, w_mu, b_mu, w_logvar, b_logvar, w_gate, b_gate, None, rng, True,
                                             ctx.activation)[3]
            dz = w_mu.shape[0]
            eps = ((z - mulv[..., :dz]) * torch.exp(-0.5 * mulv[..., dz:])).detach()
        inputs = (h, w_mu, b_mu, w_logvar, b_logvar, w_gate, b_gate)
        grads = twin_grads(lambda *a: vae_relu_router_ref(*a, noise=eps, training=ctx.training, activation=ctx.activation,
                                                          return_z=True),
                           inputs, (grad_gates, grad_logits, grad_kl, grad_z), ctx.needs_input_grad[:7])
        return (*grads, None, None, None, None)
    grads = _ops.vae_relu_router_bwd(grad_gates, grad_logits, grad_kl, grad_z, h, w_mu, w_logvar, w_gate, mulv, gates,
                                     logits, noise, rng, ctx.training, ctx.activation)
    return (*grads, None, None, None, None)


torch.library.register_autograd("doe_ext::vae_relu_router_fwd", _backward, setup_context=_setup_context)
