"""The knowledge path of a DoE layer as building blocks (CONTRACT §4), shared by the native
``DoEForCausalLM`` and the Hugging Face drop-in (``doe_ext.integrations.hf.doeify``): the router
layout (one first, one shared middle, one last router), the topic prior, and the composition of the
expert ``e = gates @ Z`` from the knowledge attention and a router."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

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
    """The routers of CONTRACT §4: ``first`` (layer 0, prior-conditioned), ONE ``middle`` module shared
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

