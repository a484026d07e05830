"""The DoE objective (eq. 4, App. A.5, App. H.3): the loss combinator, the next-token loss, the
assembly of the composite loss from the routers' outputs, and the gate telemetry (shared by the
native model and the Hugging Face drop-in)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from doe_ext.nn.knowledge_path import RouterOutput
from doe_ext.ops import expert_loss


def composite_loss(ntp: Tensor, expert: Tensor, alpha: float = 0.001, vae: Tensor | None = None,
                   beta: float = 0.0) -> Tensor:
    """``(1 - alpha) * L_ntp + alpha * L_expert`` (DoE eq. 4; the paper trains with ``alpha = 0.001``).

    The 3-component variant of App. H.3 adds ``beta * vae`` where ``vae`` is the router's
    ``kl + recon`` (mean over tokens; see :class:`doe_ext.nn.VAEReLURouter` with ``decoder=True``).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"composite_loss: expected `alpha` in [0, 1], got {alpha}")
    if beta < 0.0 or (beta > 0.0 and vae is None):
        raise ValueError(f"composite_loss: `beta` must be >= 0 and needs `vae` (the router's KL + recon), "
                         f"got beta={beta}, vae={'None' if vae is None else 'a tensor'}")
    total = (1 - alpha) * ntp + alpha * expert
    return total + beta * vae if vae is not None and beta > 0.0 else total


def gate_stats(gates: Tensor) -> dict[str, Tensor]:
    """Sparsity, share of all-zero rows, and the coefficient of variation of block utilisation (Fig. 4)."""
    active = (gates > 0).reshape(-1, gates.shape[-1])
    use = active.float().sum(0)
    return {"sparsity": 1 - active.float().mean(), "zero_rows": (~active.any(-1)).float().mean(),
            "block_cv": use.std(correction=0) / use.mean().clamp(min=1e-12)}


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """L_ntp: cross-entropy of ``logits [B, T, V]`` against ``labels [B, T]`` shifted by one (-100 ignored)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def doe_losses(ntp: Tensor, routed: list[RouterOutput], topic_ids: Tensor | None, expert_labels: Tensor | None,
               alpha: float, beta: float = 0.0, balances: list[Tensor] = (), balance_coef: float = 0.0,
               supervise_last: bool = False):
    """The composite DoE loss (docs/design.md#the-doe-model) from L_ntp and the routers' outputs, first to last layer:
    ``(1-alpha)·L_ntp + alpha·L_expert (+ beta·(KL + recon)) (+ balance_coef·MoE balance)``; L_expert
    averages every router but the last (all of them with ``supervise_last``).
    Returns ``(loss, parts)`` with the detached parts for ``aux``."""
    parts = {"ntp": ntp.detach()}
    loss = ntp
    if expert_labels is None:
        expert_labels = topic_ids
    supervised = routed[:-1] if len(routed) > 1 and not supervise_last else routed  # docs/design.md#the-doe-model
    if supervised and expert_labels is not None:
        if expert_labels.is_floating_point():  # per-document distributions [B, K]
            target = expert_labels[:, None].expand(-1, routed[0].logits.shape[1], -1)
            per_layer = [expert_loss(r.logits, target) for r in supervised]
        else:  # per-token topic ids, shifted like labels
            per_layer = [expert_loss(r.logits[:, :-1], expert_labels[:, 1:], ignore_index=-1) for r in supervised]
        l_expert = torch.stack(per_layer).mean()
        loss = composite_loss(ntp, l_expert, alpha)
        parts["expert"] = l_expert.detach()
    if routed:
        kl = torch.stack([r.kl.mean() for r in routed]).mean()
        parts["kl"] = kl.detach()
        if routed[-1].recon is not None:  # the last router reconstructs the next token's embedding
            rec = routed[-1].recon[:, :-1].mean()
            parts["recon"] = rec.detach()
            kl = kl + rec
        if beta > 0:
            loss = loss + beta * kl
    if balances:
        balance = torch.stack(balances).mean()
        parts["moe_balance"] = balance.detach()
        loss = loss + balance_coef * balance
    return loss, parts


def knowledge_outputs(options, routed: list[RouterOutput], ntp: Tensor | None, topic_ids: Tensor | None,
                      expert_labels: Tensor | None, balances: list[Tensor] = ()) -> tuple[Tensor | None, dict]:
    """One forward's loss and ``aux`` from its routers' outputs, for DoEForCausalLM and the drop-in
    alike: ``options`` has ``alpha``, ``beta``, ``supervise_last_router`` (and the MoE baseline's
    ``router_aux_loss_coef``). ``aux``: per-layer gate statistics, plus the loss parts when ``ntp``
    (a training forward) is given."""
    aux: dict = {"layers": [gate_stats(r.gates.detach()) for r in routed]}
    if ntp is None:
        return None, aux
    loss, parts = doe_losses(ntp, routed, topic_ids, expert_labels, alpha=options.alpha, beta=options.beta,
                             balances=balances, balance_coef=getattr(options, "router_aux_loss_coef", 0.0),
                             supervise_last=options.supervise_last_router)
    aux.update(parts)
    return loss, aux

