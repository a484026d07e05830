from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def vae_relu_router_ref(
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
    return_z: bool = False,
) -> tuple[Tensor, ...]:
    """Eager twin of :func:`doe_ext.ops.vae_relu_router` (DoE App. A.3): three ``F.linear`` and
    elementwise ops. Draws ``noise`` with ``torch.randn`` when training and none is given (so it does
    not reproduce the fused op's Philox draws; pass ``noise`` to compare the two)."""
    if activation not in ("relu", "softmax"):
        raise ValueError(f'vae_relu_router_ref: activation must be "relu" or "softmax", got "{activation}"')
    mu = F.linear(h, w_mu, b_mu)  # (..., dz)
    logvar = F.linear(h, w_logvar, b_logvar)  # (..., dz)
    if training:
        if noise is None:
            noise = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * noise
    else:
        z = mu
    logits = F.linear(z, w_gate, b_gate)  # (..., K)
    gates = torch.relu(logits) if activation == "relu" else torch.softmax(logits, dim=-1)
    kl = 0.5 * (torch.exp(logvar) + mu.square() - 1 - logvar).sum(-1)  # (...)
    return (gates, logits, kl, z) if return_z else (gates, logits, kl)
