"""DoEConfig: a Llama-style decoder whose FFN blocks carry DoE's knowledge path (docs/design.md#the-doe-model)."""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, PretrainedConfig

ROUTERS = ("vae_relu", "vae_softmax", "none", "moe_topk")
SIGNAL_SOURCES = ("v", "k", "q", "none")
FUSIONS = ("add", "concat")
BLOCKS = ("state", "ffn")


def check_knowledge_options(owner: str, options, routers: tuple[str, ...] = ROUTERS) -> None:
    """The checks of the knowledge-path options DoEConfig and doeify's DoEifyConfig share (``options``
    has the attributes): each message names ``owner.field``, the value and what is expected."""
    for name, allowed in (("router", routers), ("signal_source", SIGNAL_SOURCES), ("fusion", FUSIONS)):
        if getattr(options, name) not in allowed:
            raise ValueError(f"{owner}.{name}={getattr(options, name)!r}: expected one of {allowed}")
    for name in ("num_topics", "topic_dim", "latent_dim"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}.{name}={value!r}: expected an int >= 1")
    if not 0.0 <= options.alpha <= 1.0:
        raise ValueError(f"{owner}.alpha={options.alpha}: expected 0 <= alpha <= 1")
    if options.beta < 0:
        raise ValueError(f"{owner}.beta={options.beta}: expected >= 0")


@strict
class DoEConfig(LlamaConfig):
    """Llama's fields (vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
    intermediate_size, rope, norms ...) plus DoE's. Defaults follow the paper where it gives one.

    DoE fields:
        num_topics: K, LDA topics = knowledge blocks = rows of the knowledge state Z (paper: 128).
        topic_dim: width of the topic embedding added to the token embedding (DoE §3.3).
        latent_dim: width of the VAE router's latent z (App. A.3).
        router: "vae_relu" (DoE), "vae_softmax" (Table 3 B), "none" (no router: knowledge
            attention only), "moe_topk" (the conventional MoE FFN baseline of Table 3 A).
        signal_source: which attention states feed the router, as a causal prefix mean (App. H.1).
        fusion: "add" gives FFN(h_enr + e); "concat" gives FFN([h_enr; e]) (App. H.2).
        blocks: "state" composes e = G·Z; "ffn" also gives each block a small FFN run only for the
            tokens whose gate is non-zero (active < total parameters, §4.5).
        block_ffn_dim: hidden width of each block FFN (blocks="ffn"); default intermediate_size // 8.
        alpha: weight of the expert-label loss, (1-alpha)·L_ntp + alpha·L_expert (eq. 4).
        beta: weight of KL + reconstruction, the 3-component loss of App. H.3 (0 = off).
        router_decoder: the last layer's router reconstructs the next token's embedding (§3.3).
        knowledge: False gives the dense "Base" model of Fig. 3 (no knowledge path at all).
        topic_input: feed the topic embedding (DualInputEmbedding) into the model; None (default)
            means "when there is a knowledge path". ``knowledge=False, topic_input=True`` is the
            control of Fig. 3 that separates the topic input from the knowledge path.
        supervise_last_router: also supervise the last layer's router with L_expert (by default it
            is excluded: docs/design.md#the-doe-model); its next-topic predictions drive generation.
        num_experts, num_experts_per_tok, router_aux_loss_coef: the moe_topk baseline.
    """

    model_type = "doe"

    num_topics: int = 128
    topic_dim: int = 64
    latent_dim: int = 128
    router: str = "vae_relu"
    signal_source: str = "v"
    fusion: str = "add"
    blocks: str = "state"
    block_ffn_dim: int | None = None
    alpha: float = 0.001
    beta: float = 0.0
    router_decoder: bool = False
    knowledge: bool = True
    topic_input: bool | None = None
    supervise_last_router: bool = False
    num_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.01

    def __post_init__(self, **kwargs):
        check_knowledge_options("DoEConfig", self)
        if self.blocks not in BLOCKS:
            raise ValueError(f"DoEConfig.blocks={self.blocks!r}: expected one of {BLOCKS}")
        for name in ("num_experts", "num_experts_per_tok"):
            if getattr(self, name) < 1:
                raise ValueError(f"DoEConfig.{name}={getattr(self, name)}: expected >= 1")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"DoEConfig.num_experts_per_tok={self.num_experts_per_tok}: expected <= "
                             f"num_experts={self.num_experts}")
        if self.block_ffn_dim is None:
            self.block_ffn_dim = max(8, self.intermediate_size // 8)
        super().__post_init__(**kwargs)

    @property
    def has_knowledge_path(self) -> bool:
        return self.knowledge and self.router != "moe_topk"

    @property
    def has_topic_input(self) -> bool:
        return self.has_knowledge_path if self.topic_input is None else self.topic_input

    @property
    def has_router(self) -> bool:
        return self.has_knowledge_path and self.router in ("vae_relu", "vae_softmax")


# The config.json of a folder that DoEWrapper.save_pretrained (doe_ext.integrations.hf.doeify) writes.
# With it, AutoModelForCausalLM.from_pretrained(folder) gives the drop-in back (doe_ext registers the
# type with transformers' Auto classes, doe_ext._auto), and without doe_ext it fails, naming the model
# type, rather than loading the base alone as if its knowledge path were not there. The doeify options
# and the adapter stay where save_knowledge writes them (doe_config.json); the base model is saved in
# its own layout in the subfolder `base`.
class DoEDropInConfig(PretrainedConfig):
    """Args:
        base_model_type: the base's model type (informative: the base's own config is in ``base/``).
    """

    model_type = "doe_ext_drop_in"

    def __init__(self, base_model_type: str | None = None, **kwargs):
        self.base_model_type = base_model_type
        super().__init__(**kwargs)
