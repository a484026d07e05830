"""DoE's knowledge path (docs/design.md#the-doe-model), one implementation for the native ``DoEForCausalLM`` and the
Hugging Face drop-in (``doe_ext.integrations.hf.doeify``).

:class:`KnowledgePath` owns what the layers share: Z (``knowledge_state``), the routers (one first,
one shared middle, one last) and the topic prior. One forward's work goes through an explicit
:class:`KnowledgeStep`, made at the start of the forward and passed to every layer, never kept:

    step = path.begin(topic_ids, cache, pad_mask, reconstruct)  # the prior, what the last router rebuilds
    step.embeds = x                                               # the input embedding (the reconstruction target)
    h_enr, e, routed = step.layer(i, h, signal, W_q, W_s)         # per layer: knowledge attention, router, G^T Z
    step.routed[i] = routed                                       # recorded by the host (checkpointing returns it)
    routed, next_topic_ids = step.finish()                        # the routers' outputs, the predicted topics

Each host supplies only how it reaches its layers: the native model calls its layers with the step,
the drop-in's wrapped modules find the step of the base forward now running.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from doe_ext.models.cache import causal_prefix_mean, record_next_topics
from doe_ext.nn.knowledge_attention import KnowledgeAttention
from doe_ext.nn.vae_relu_router import VAEReLURouter


@dataclass
class RouterOutput:
    gates: Tensor  # (B, T, K)
    logits: Tensor  # (B, T, K) pre-activation, for L_expert
    kl: Tensor  # (B, T)
    recon: Tensor | None = None  # (B, T): the last router's error reconstructing the next token's embedding


def compose_expert(h: Tensor, z: Tensor, knowledge_attention: KnowledgeAttention, signal_proj: nn.Module | None,
                   signal: Tensor | None, router: nn.Module | None, prior: Tensor | None,
                   recon_target: Tensor | None = None) -> tuple[Tensor, Tensor, RouterOutput | None]:
    """The knowledge path of one layer up to the fusion (shared with the Hugging Face drop-in):
    ``h [B, T, d]`` (H_mha) -> ``(h_enr, e, routed)`` with ``e = gates @ Z`` (zeros without a router)."""
    h_enr = knowledge_attention(h, state=z)  # h + softmax(h W_q Z^T / sqrt d) Z
    if router is None:
        return h_enr, torch.zeros_like(h_enr), None
    r = h_enr if signal_proj is None else h_enr + signal_proj(signal)
    if prior is not None:
        r = r + prior
    routed = RouterOutput(*router(r, recon_target))
    return h_enr, routed.gates @ z, routed  # (B, T, d): the composed expert


def make_routers(d: int, latent_dim: int, num_topics: int, num_layers: int, router: str = "vae_relu",
                 decoder: bool = False) -> nn.ModuleDict:
    """The routers of docs/design.md#the-doe-model: ``first`` (layer 0, prior-conditioned), ONE ``middle`` module shared
    by layers 1..L-2, ``last`` (optionally with the decoder that predicts the next token's embedding)."""
    activation = "relu" if router == "vae_relu" else "softmax"
    make = lambda decoder=False: VAEReLURouter(d, latent_dim, num_topics, activation=activation,  # noqa: E731
                                               decoder=decoder)
    routers = nn.ModuleDict({"first": make()})
    if num_layers > 2:
        routers["middle"] = make()
    if num_layers > 1:
        routers["last"] = make(decoder=decoder)
    return routers


def layer_router(routers: nn.ModuleDict, i: int, num_layers: int) -> nn.Module | None:
    """The router of layer ``i`` in ``make_routers``' layout (None without routers)."""
    if not routers:
        return None
    if i == 0:
        return routers["first"]
    return routers["last"] if i == num_layers - 1 else routers["middle"]


def topic_prior_embedding(topic_prior: nn.Embedding, topic_ids: Tensor) -> Tensor:
    """``E_prior[topic_ids]`` with topic -1 (unlabeled) contributing zeros."""
    return topic_prior(topic_ids.clamp(min=0)) * (topic_ids >= 0)[..., None]


def next_embedding_target(embeds: Tensor) -> Tensor:
    """The last router's reconstruction target: at position t the input embedding of token t+1
    ``[B, T, d]`` (zeros at the last position, whose term the loss drops), without gradient."""
    return torch.nn.functional.pad(embeds[:, 1:].detach(), (0, 0, 0, 1))


class KnowledgePath(nn.Module):
    """Z, the routers and the topic prior of a DoE model (docs/design.md#the-doe-model), and :meth:`begin`, which
    starts one forward's :class:`KnowledgeStep`. The per-layer parts (the knowledge attention's
    ``W_q``, the signal projection ``W_s``) belong to the layers and come with each layer call.

    Args:
        d: the hidden width; num_topics: K, the rows of Z; num_layers: the decoder layers.
        latent_dim: the VAE router's latent width.
        router: ``"vae_relu"`` (DoE), ``"vae_softmax"`` or ``"none"`` (knowledge attention only: no
            routers, no prior).
        router_decoder: the last router reconstructs the next token's embedding.

    Z starts at zero and the prior at zero (the drop-in's exact no-op); a model that trains from
    scratch initialises Z itself."""

    def __init__(self, d: int, num_topics: int, num_layers: int, latent_dim: int, router: str = "vae_relu",
                 router_decoder: bool = False):
        super().__init__()
        self.num_layers = num_layers
        self.knowledge_state = nn.Parameter(torch.zeros(num_topics, d))  # Z
        routed = router != "none"
        self.routers = make_routers(d, latent_dim, num_topics, num_layers, router, router_decoder) if routed \
            else nn.ModuleDict()
        self.topic_prior = nn.Embedding(num_topics, d) if routed else None  # E_prior
        if self.topic_prior is not None:
            nn.init.zeros_(self.topic_prior.weight)

    def router(self, i: int) -> nn.Module | None:
        """Layer ``i``'s router (None without routers)."""
        return layer_router(self.routers, i, self.num_layers)

    def begin(self, topic_ids: Tensor | None, cache: Any = None, pad_mask: Tensor | None = None,
              reconstruct: bool = False, embeds: Tensor | None = None) -> "KnowledgeStep":
        """One forward's step: ``topic_ids [B, T]`` (-1: none) give layer 0's prior; ``cache`` keeps the
        signal's running sums and the predicted topics; ``pad_mask [B, T]``; ``reconstruct``: the last
        router's decoder (if any) rebuilds each next input embedding (``embeds``, set now or later)."""
        prior = None
        if self.topic_prior is not None and topic_ids is not None:
            prior = topic_prior_embedding(self.topic_prior, topic_ids)
        last = self.router(self.num_layers - 1)
        reconstruct = bool(reconstruct and last is not None and last.decoder is not None)
        return KnowledgeStep(self, topic_ids, cache, pad_mask, prior, reconstruct, embeds)


@dataclass
class KnowledgeStep:
    """One forward through a :class:`KnowledgePath`: made by :meth:`KnowledgePath.begin`, passed to
    each layer call, done with :meth:`finish`. ``routed``: layer -> its router's output, recorded by the
    host (a checkpointed layer hands it back as an output)."""

    path: KnowledgePath
    topic_ids: Tensor | None
    cache: Any
    pad_mask: Tensor | None
    prior: Tensor | None  # (B, T, d): E_prior[topic_ids], layer 0's router input
    reconstruct: bool
    embeds: Tensor | None = None  # (B, T, d): the input embedding (the reconstruction target)
    routed: dict[int, RouterOutput] = field(default_factory=dict)

    def layer(self, i: int, h: Tensor, signal: Tensor | None, knowledge_attention: KnowledgeAttention,
              signal_proj: nn.Module | None) -> tuple[Tensor, Tensor, RouterOutput | None]:
        """Layer ``i``: ``h [B, T, d]`` (H_mha) and the attention's per-token ``signal`` (its causal
        prefix mean is taken here) -> ``(h_enr, e, routed)``, ``e = gates @ Z``."""
        path, last = self.path, i == self.path.num_layers - 1
        if signal is not None and signal_proj is not None:
            signal = causal_prefix_mean(signal, self.pad_mask, self.cache, i)
        target = next_embedding_target(self.embeds) if last and self.reconstruct and self.embeds is not None else None
        return compose_expert(h, path.knowledge_state, knowledge_attention, signal_proj, signal, path.router(i),
                              self.prior if i == 0 else None, target)

    def finish(self) -> tuple[list[RouterOutput], Tensor | None]:
        """The routers' outputs in layer order, and each position's predicted next topic (the last
        router's argmax ``[B, T]``, None without routers; recorded in the cache's DoE state)."""
        routed = [self.routed[i] for i in sorted(self.routed)]
        return routed, record_next_topics(routed, self.cache)
