"""The adapter table: where each model family keeps what DoE's knowledge path needs.

Adding a family is one entry in ``ADAPTERS`` (keyed by ``config.model_type``). Every path is a
dotted attribute path. The MLP's input must be the post-attention norm output (H_mha): true of
every pre-norm decoder in transformers (``mlp(post_attention_layernorm(x))`` in Llama, Qwen2,
Mistral; ``mlp(ln_2(x))`` in GPT-2), so the wrapped MLP sees H_mha without a hook on the norm.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyAdapter:
    """Where one family keeps its parts.

    Args:
        layers: causal LM -> the ``nn.ModuleList`` of decoder layers.
        embedding: causal LM -> the token embedding (an ``nn.Embedding``).
        attention: decoder layer -> its self-attention module.
        mlp: decoder layer -> its MLP, whose input is the post-attention norm output (H_mha).
        mlp_inputs: MLP -> its input projections, widened by ``fusion="concat"``.
        qkv: attention -> separate (q, k, v) projections, the router's signal source.
        fused_qkv: attention -> one projection whose output is ``[q | k | v]`` (GPT-2's ``c_attn``).
    """

    layers: str
    embedding: str
    attention: str
    mlp: str
    mlp_inputs: tuple[str, ...]
    qkv: tuple[str, str, str] | None = None
    fused_qkv: str | None = None

    def __post_init__(self):
        if (self.qkv is None) == (self.fused_qkv is None):
            raise ValueError("FamilyAdapter: give exactly one of `qkv` (separate projections) and `fused_qkv`")


LLAMA_LIKE = FamilyAdapter(layers="model.layers", embedding="model.embed_tokens", attention="self_attn", mlp="mlp",
                           mlp_inputs=("gate_proj", "up_proj"), qkv=("q_proj", "k_proj", "v_proj"))

ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "gpt2": FamilyAdapter(layers="transformer.h", embedding="transformer.wte", attention="attn", mlp="mlp",
                          mlp_inputs=("c_fc",), fused_qkv="c_attn"),
}
