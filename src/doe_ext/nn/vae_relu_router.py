from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from doe_ext.ops import RouterStats, vae_relu_router
from doe_ext.reference import vae_relu_router_ref


class VAEReLURouter(nn.Module):
    """The AGC's VAE router with a ReLU gate (DoE §3.4, App. A.3; softmax for Table 3 (B)).

    ``h -> (mu, logvar) -> z = mu + sigma * eps -> logits = gate(z) -> gates = relu(logits)``, plus the
    per-token ``KL(q(z|h) || N(0, I))``. ``gates`` weight the K knowledge blocks (``e = gates @ Z``);
    ``logits`` feed the expert loss; ``kl`` (and, with a decoder, the reconstruction error) the
    3-component loss of App. H.3.

    Args:
        d_model: width of the router input ``h``.
        latent_dim: width of z.
        num_topics: K, the number of knowledge blocks (gates): the LDA topic count, as everywhere in the package.
        activation: ``"relu"`` (DoE) or ``"softmax"`` (the VAE-softmax ablation).
        decoder: add a linear decoder ``z -> [decoder_dim]`` that reconstructs a given target (the
            input itself, or the next token's embedding for the last layer, §3.3).
        decoder_dim: width of the reconstruction target; ``d_model`` by default.
        reference: run the plain-PyTorch twin instead of the fused op.

    After each call, ``last_stats`` holds a :class:`doe_ext.ops.RouterStats` (per-block activation
    counts and all-zero rows as device tensors: reading them is the only sync).
    """

    def __init__(self, d_model: int, latent_dim: int, num_topics: int, activation: str = "relu",
                 decoder: bool = False, decoder_dim: int | None = None, reference: bool = False):
        super().__init__()
        if d_model < 1 or latent_dim < 1 or num_topics < 1:
            raise ValueError(f"VAEReLURouter: d_model, latent_dim and num_topics must be >= 1, got d_model={d_model}, "
                             f"latent_dim={latent_dim}, num_topics={num_topics}")
        if activation not in ("relu", "softmax"):
            raise ValueError(f'VAEReLURouter: activation must be "relu" or "softmax", got "{activation}"')
        self.d_model, self.latent_dim, self.num_topics = d_model, latent_dim, num_topics
        self.activation, self.reference = activation, reference
        self.mu = nn.Linear(d_model, latent_dim)  # mu_phi(h), eq. 5
        self.logvar = nn.Linear(d_model, latent_dim)  # log sigma_phi^2(h), eq. 5
        self.gate = nn.Linear(latent_dim, num_topics)  # gating network on z
        self.decoder = nn.Linear(latent_dim, decoder_dim or d_model) if decoder else None  # p_psi(h|z), eq. 7
        self.last_stats: RouterStats | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in (self.mu, self.logvar, self.gate, self.decoder):
            if m is not None:
                m.reset_parameters()
        # Start near the prior's scale (sigma ~ 0.37) so early routing is not drowned in noise.
        nn.init.zeros_(self.logvar.weight)
        nn.init.constant_(self.logvar.bias, -2.0)

    def forward(self, h: Tensor, recon_target: Tensor | None = None) -> tuple[Tensor, ...]:
        """``h [..., d_model]`` -> ``(gates [..., K], logits [..., K], kl [...])``.

        With a decoder and a ``recon_target [..., decoder_dim]``, a fourth output: the per-token
        reconstruction error ``mean((decoder(z) - recon_target)**2, -1)`` ``[...]``.
        """
        args = (h, self.mu.weight, self.mu.bias, self.logvar.weight, self.logvar.bias, self.gate.weight, self.gate.bias)
        want_z = recon_target is not None
        if want_z and self.decoder is None:
            raise ValueError("VAEReLURouter: recon_target given but the router has no decoder (decoder=False)")
        if self.reference:
            out = vae_relu_router_ref(*args, training=self.training, activation=self.activation, return_z=want_z)
            active = out[0].detach().reshape(-1, self.num_topics) > 0
            self.last_stats = RouterStats(active.sum(0), active.any(-1).logical_not().sum(), active.shape[0])
        else:
            *out, stats = vae_relu_router(*args, training=self.training, activation=self.activation, return_z=want_z,
                                          return_stats=True)
            self.last_stats = stats
        if not want_z:
            return tuple(out)
        gates, logits, kl, z = out
        recon = F.mse_loss(self.decoder(z), recon_target, reduction="none").mean(-1)
        return gates, logits, kl, recon

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, latent_dim={self.latent_dim}, num_topics={self.num_topics}, "
                f"activation={self.activation}, decoder={self.decoder is not None}")


class SparsityController(nn.Module):
    """Adaptive L1 on the gates (ReMoE, ICLR 2025): keeps a ReLU router near a target sparsity
    without a load balancer. Off by default: DoE has none; the ablations turn it on.

    ``penalty(gates) = coef * mean_tokens(sum_k |gates_k|)`` is added to the loss; after each step,
    ``update(gates)`` multiplies ``coef`` by ``factor`` when the gates are less sparse than the target
    and divides it otherwise (outside autograd, on the device: no host sync).

    Args:
        target_sparsity: wanted share of zero gates, in [0, 1).
        init_coef: starting L1 coefficient (ReMoE: 1e-8).
        factor: multiplicative step (ReMoE: 1.2).
        enabled: when False, ``penalty`` is 0 and ``update`` does nothing.
    """

    def __init__(self, target_sparsity: float = 0.9, init_coef: float = 1e-8, factor: float = 1.2,
                 enabled: bool = False):
        super().__init__()
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"SparsityController: target_sparsity must be in [0, 1), got {target_sparsity}")
        if factor <= 1.0 or init_coef <= 0.0:
            raise ValueError(f"SparsityController: need factor > 1 and init_coef > 0, got factor={factor}, "
                             f"init_coef={init_coef}")
        self.target_sparsity, self.factor, self.enabled = target_sparsity, factor, enabled
        self.register_buffer("coef", torch.tensor(float(init_coef)))

    def penalty(self, gates: Tensor) -> Tensor:
        if not self.enabled:
            return gates.new_zeros(())
        return self.coef.to(gates.dtype) * gates.abs().sum(-1).mean()

    @torch.no_grad()
    def update(self, gates: Tensor) -> Tensor:
        """Step ``coef`` toward the target from the batch's gates; returns the batch's sparsity."""
        sparsity = (gates == 0).float().mean()
        if self.enabled:
            up = torch.tensor(self.factor, device=self.coef.device, dtype=self.coef.dtype)
            self.coef.mul_(torch.where(sparsity.to(self.coef.device) < self.target_sparsity, up, 1 / up))
        return sparsity

    def extra_repr(self) -> str:
        return f"target_sparsity={self.target_sparsity}, factor={self.factor}, enabled={self.enabled}"
