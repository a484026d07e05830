"""The DoE language model (docs/design.md#the-doe-model), a Llama-style decoder whose FFN block gains DoE's knowledge
path, plus the paper's baselines in the same code (dense "Base", softmax top-k MoE).

Reads top-down: attention (which also hands out the router's signal) -> knowledge FFN -> MoE
baseline FFN -> decoder layer -> model -> causal LM head, losses and generation.

One DoE layer, residual stream x:
    x     = x + SelfAttention(norm1(x))              # also the per-token q/k/v for the signal
    h     = norm2(x)                                 # H_mha
    s     = causal_mean(signal)                      # App. H.1: v (default) | k | q | none
    h_enr = KnowledgeAttention(h; Z)                 # eq. 1-3, Z [K, d]: one knowledge state per model
    r     = h_enr + W_s s  (+ E_prior[topic] in layer 0)
    gates, logits, kl = Router_l(r)                  # VAE-ReLU | VAE-softmax | none
    e     = gates @ Z                                # the composed expert G^T Z (App. A.1)
    x     = x + FFN(h_enr + e)                       # or FFN([h_enr; e]) with fusion="concat"
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from doe_ext import _auto
from doe_ext.losses import knowledge_outputs, next_token_loss
from doe_ext.models.cache import DoECache, extend_history, step_topics, with_doe_cache
from doe_ext.models.configuration_doe import DoEConfig
from doe_ext.nn import DualInputEmbedding, KnowledgeAttention
from doe_ext.nn.knowledge_path import KnowledgePath, KnowledgeStep, RouterOutput


class SwiGLU(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_in, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_in, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DoEAttention(nn.Module):
    """Llama's attention (RoPE, GQA, KV cache, any HF attention backend) that also returns the
    pre-RoPE ``q``, ``k`` or ``v`` of every token (heads concatenated) as the router's signal."""

    def __init__(self, config: DoEConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, config.num_attention_heads * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, d, bias=config.attention_bias)

    def forward(self, x: Tensor, position_embeddings, attention_mask, cache: Cache | None, **kwargs):
        B, T, _ = x.shape
        q_lin, k_lin, v_lin = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, heads*hd)
        signal = {"q": q_lin, "k": k_lin, "v": v_lin}.get(self.config.signal_source)
        q = q_lin.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k_lin.view(B, T, -1, self.head_dim).transpose(1, 2)
        v = v_lin.view(B, T, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attend(self, q, k, v, attention_mask, scaling=self.scaling,
                              dropout=self.attention_dropout if self.training else 0.0, **kwargs)
        return self.o_proj(out.reshape(B, T, -1).contiguous()), signal, weights


class KnowledgeFFN(nn.Module):
    """The FFN block of a DoE layer: knowledge attention, routing, composed expert, fusion."""

    def __init__(self, config: DoEConfig):
        super().__init__()
        d, K = config.hidden_size, config.num_topics
        self.fusion, self.blocks = config.fusion, config.blocks
        self.knowledge_attention = KnowledgeAttention(d, K, shared_state=True)  # W_q; Z is the model's
        sig_dim = {"q": config.num_attention_heads, "k": config.num_key_value_heads,
                   "v": config.num_key_value_heads}.get(config.signal_source, 0) * config.head_dim
        self.signal_proj = nn.Linear(sig_dim, d, bias=False) if config.has_router and sig_dim else None  # W_s
        self.mlp = SwiGLU(2 * d if config.fusion == "concat" else d, config.intermediate_size, d)
        if config.blocks == "ffn":  # one small SwiGLU per knowledge block
            f = config.block_ffn_dim
            self.block_up = nn.Parameter(torch.empty(K, 2 * f, d))
            self.block_down = nn.Parameter(torch.empty(K, d, f))

    def block_ffns(self, h: Tensor, gates: Tensor) -> Tensor:
        """``sum_k gates_k * BlockFFN_k(h)``, computed only for (token, block) pairs with a non-zero
        gate: a block whose gate is exactly zero does no work and gets exactly zero gradient."""
        flat_h, flat_g = h.reshape(-1, h.shape[-1]), gates.reshape(-1, gates.shape[-1])
        out = torch.zeros_like(flat_h)
        tok, blk = flat_g.nonzero(as_tuple=True)  # host sync: data-dependent work, by design
        for k in blk.unique().tolist():
            rows = tok[blk == k]
            gate_up = flat_h[rows] @ self.block_up[k].T  # (n, 2f)
            g, u = gate_up.chunk(2, dim=-1)
            y = (F.silu(g) * u) @ self.block_down[k].T  # (n, d)
            out = out.index_add(0, rows, flat_g[rows, k, None] * y)
        return out.view_as(h)

    def forward(self, h: Tensor, step: KnowledgeStep, i: int, signal: Tensor | None) -> tuple[Tensor, RouterOutput | None]:
        h_enr, e, routed = step.layer(i, h, signal, self.knowledge_attention, self.signal_proj)
        out = self.mlp(h_enr + e if self.fusion == "add" else torch.cat([h_enr, e], dim=-1))
        if self.blocks == "ffn" and routed is not None:
            out = out + self.block_ffns(h_enr, routed.gates)
        return out, routed


class TopKMoE(nn.Module):
    """The conventional MoE FFN of Table 3 (A): softmax router, top-k experts, renormalised weights,
    Switch-style load-balancing loss ``E * sum_i f_i P_i``."""

    def __init__(self, config: DoEConfig):
        super().__init__()
        self.k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(config.hidden_size, config.intermediate_size, config.hidden_size)
                                     for _ in range(config.num_experts))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        flat = h.reshape(-1, h.shape[-1])
        probs = self.gate(flat).softmax(-1)  # (N, E)
        weights, chosen = probs.topk(self.k, dim=-1)  # (N, k)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = (chosen == e).nonzero(as_tuple=True)
            if tok.numel():
                out = out.index_add(0, tok, weights[tok, slot, None] * expert(flat[tok]))
        E = len(self.experts)
        f = F.one_hot(chosen, E).sum((0, 1)).to(probs.dtype) / max(chosen.numel(), 1)
        balance = E * (f * probs.mean(0)).sum()
        return out.view_as(h), balance


class LayerOutput(NamedTuple):
    """What a :class:`DoEDecoderLayer` returns: a tuple of fixed length, so that everything carrying
    gradient leaves the layer as one of its tensors (reentrant gradient checkpointing keeps only
    those: the expert-label and KL gradients survive). A checkpoint may hand it back as a plain
    tuple: ``LayerOutput(*outputs)`` names it again."""

    hidden: Tensor
    attention_weights: Tensor | None = None
    gates: Tensor | None = None  # the router's, when the layer has one
    logits: Tensor | None = None
    kl: Tensor | None = None
    recon: Tensor | None = None
    balance: Tensor | None = None  # the MoE baseline's load-balancing loss

    @property
    def routed(self) -> RouterOutput | None:
        return None if self.gates is None else RouterOutput(self.gates, self.logits, self.kl, self.recon)


class DoEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DoEConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.self_attn = DoEAttention(config, layer_idx)
        self.input_layernorm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        if config.has_knowledge_path:
            self.ffn = KnowledgeFFN(config)
        elif config.knowledge and config.router == "moe_topk":
            self.ffn = TopKMoE(config)
        else:
            self.ffn = SwiGLU(d, config.intermediate_size, d)  # the dense Base

    def forward(self, x: Tensor, attention_mask=None, position_embeddings=None, cache: Cache | None = None,
                knowledge: KnowledgeStep | None = None, **kwargs) -> LayerOutput:
        """``knowledge``: this forward's step of the model's knowledge path (a DoE layer needs it)."""
        a, signal, weights = self.self_attn(self.input_layernorm(x), position_embeddings, attention_mask, cache,
                                            **kwargs)
        x = x + a
        h = self.post_attention_layernorm(x)  # H_mha
        if isinstance(self.ffn, KnowledgeFFN):
            out, routed = self.ffn(h, knowledge, self.layer_idx, signal)
            return LayerOutput(x + out, weights, *(() if routed is None else
                                                   (routed.gates, routed.logits, routed.kl, routed.recon)))
        if isinstance(self.ffn, TopKMoE):
            out, balance = self.ffn(h)
            return LayerOutput(x + out, weights, balance=balance)
        return LayerOutput(x + self.ffn(h), weights)


class DoEPreTrainedModel(PreTrainedModel):
    config_class = DoEConfig
    config: DoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DoEDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, KnowledgeFFN) and module.blocks == "ffn":
            nn.init.normal_(module.block_up, std=std)
            nn.init.normal_(module.block_down, std=std)
        if isinstance(module, KnowledgePath):
            nn.init.normal_(module.knowledge_state, std=std)
            if module.topic_prior is not None:
                nn.init.zeros_(module.topic_prior.weight)  # the prior starts as a no-op


class DoEModel(DoEPreTrainedModel):
    def __init__(self, config: DoEConfig):
        super().__init__(config)
        d, K, L = config.hidden_size, config.num_topics, config.num_hidden_layers
        if config.has_topic_input:
            self.embed_tokens = DualInputEmbedding(config.vocab_size, d, K, config.topic_dim,
                                                   padding_idx=config.pad_token_id)
        else:
            self.embed_tokens = nn.Embedding(config.vocab_size, d, config.pad_token_id)
        # Z, the routers (layer 0 its own, prior-conditioned; the middle layers ONE shared module; the last
        # its own, optionally with a decoder) and the topic prior, shared by every layer
        self.knowledge = (KnowledgePath(d, K, L, config.latent_dim, config.router if config.has_router else "none",
                                        config.router_decoder) if config.has_knowledge_path else None)
        self.layers = nn.ModuleList(DoEDecoderLayer(config, i) for i in range(L))
        self.norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding (with a dual embedding, its token part :class:`~doe_ext.nn.TokenEmbedding`):
        ``model(inputs_embeds=model.get_input_embeddings()(ids), topic_ids=t)`` equals ``model(ids, topic_ids=t)``."""
        return self.embed_tokens.tokens if isinstance(self.embed_tokens, DualInputEmbedding) else self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        """An ``nn.Embedding`` becomes the token table (a dual embedding keeps its topic table and
        projection); a :class:`DualInputEmbedding` replaces the whole embedding."""
        if isinstance(self.embed_tokens, DualInputEmbedding) and not isinstance(value, DualInputEmbedding):
            if value is not self.embed_tokens.tokens:
                if value.weight.shape[1] != self.embed_tokens.d_model:
                    raise ValueError(f"DoEModel.set_input_embeddings: `value` has width {value.weight.shape[1]}, "
                                     f"the model {self.embed_tokens.d_model}")
                self.embed_tokens.token_weight = value.weight
                self.embed_tokens.vocab_size = value.weight.shape[0]
            return
        self.embed_tokens = value

    def embed(self, input_ids: Tensor | None, topic_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        """The input embedding: the token part (``get_input_embeddings()(input_ids)``, or ``inputs_embeds``
        given for it), then the topic part from ``topic_ids`` (one path, so the two are equal)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("DoEModel: pass exactly one of `input_ids` and `inputs_embeds`")
        tokens = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        return self.embed_tokens.combine(tokens, topic_ids) if isinstance(self.embed_tokens, DualInputEmbedding) else tokens

    def forward(self, input_ids: Tensor | None = None, topic_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None, cache: Cache | None = None,
                inputs_embeds: Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None, reconstruct: bool = False, **kwargs):
        """As ``LlamaModel.forward``, plus ``topic_ids [B, T]`` (-1: none) and ``reconstruct``: the last
        router's decoder (if any) reconstructs each position's next input embedding (the last
        position's target is zeros; the loss drops it). Returns a :class:`DoEModelOutput` (a tuple
        with ``return_dict=False``). ``output_attentions`` needs ``attn_implementation="eager"``."""
        cfg = self.config
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        return_dict = cfg.return_dict if return_dict is None else return_dict
        x = self.embed(input_ids, topic_ids, inputs_embeds)
        if use_cache and cache is None:
            cache = DoECache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(x.shape[1], device=x.device) + past)[None]
        mask = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        pad_mask = attention_mask[:, -x.shape[1]:] if attention_mask is not None and attention_mask.dim() == 2 else None
        pos = self.rotary_emb(x, position_ids=position_ids)
        step = None if self.knowledge is None else self.knowledge.begin(topic_ids, cache, pad_mask, reconstruct, x)
        balances, hidden, attentions = [], [], []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden.append(x)
            outputs = LayerOutput(*layer(x, attention_mask=mask, position_embeddings=pos, cache=cache, knowledge=step,
                                         **kwargs))
            x = outputs.hidden
            attentions.append(outputs.attention_weights)
            if outputs.routed is not None:  # what a checkpointed layer returned, with its gradient
                step.routed[i] = outputs.routed
            if outputs.balance is not None:
                balances.append(outputs.balance)
        routed, next_topics = step.finish() if step is not None else ([], None)
        x = self.norm(x)
        out = DoEModelOutput(last_hidden_state=x, cache=cache,
                             hidden_states=tuple(hidden) + (x,) if output_hidden_states else None,
                             attentions=tuple(attentions) if output_attentions else None,
                             router_outputs=tuple(routed), moe_balances=tuple(balances), next_topic_ids=next_topics)
        return out if return_dict else out.to_tuple()


@dataclass
class DoEModelOutput(BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus what the routers gave (``RouterOutput``, one per routed layer, in
    layer order), the topic the last router predicts for each next token ``[B, T]`` and the MoE
    baseline's load-balancing losses."""

    router_outputs: tuple[RouterOutput, ...] | None = None
    next_topic_ids: Tensor | None = None
    moe_balances: tuple[Tensor, ...] | None = None


@dataclass
class DoECausalLMOutput(CausalLMOutputWithPast):
    """``aux``: the loss parts (``ntp``, ``expert``, ``kl``, ``recon``, ``moe_balance``) and per-layer
    gate statistics; ``next_topic_ids [B, T]``: the topic the last router predicts for the next token."""

    aux: dict | None = None
    next_topic_ids: Tensor | None = None


class DoEForCausalLM(DoEPreTrainedModel, GenerationMixin):
    def __init__(self, config: DoEConfig):
        super().__init__(config)
        # tie_word_embeddings: the LM head shares the token table (the dual embedding's token_weight)
        self._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.token_weight" if config.has_topic_input
                                   else "model.embed_tokens.weight"}
        self.model = DoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def num_parameters_active(self, aux: dict | None = None) -> tuple[int, int]:
        """(total, active per token) parameters. With blocks="ffn" a token runs only the block FFNs of
        its non-zero gates: given a forward's ``aux``, they count at that batch's share of open gates
        (without it, every block counts as active)."""
        total = sum(p.numel() for p in self.parameters())
        block = sum(p.numel() for n, p in self.named_parameters() if ".block_" in n)
        layers = (aux or {}).get("layers") or []
        share = float(torch.stack([1 - s["sparsity"] for s in layers]).mean()) if layers else 1.0
        return total, int(total - block + share * block)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def _resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of=None, mean_resizing=True):
        """transformers' resize, for the dual embedding too: its token table is resized as an
        ``nn.Embedding`` would be (new rows from the old rows' mean and covariance with
        ``mean_resizing``), the topic table and projection are kept, the LM head follows."""
        emb = self.model.embed_tokens
        if not isinstance(emb, DualInputEmbedding):
            return super()._resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        table = nn.Embedding(emb.vocab_size, emb.d_model, padding_idx=emb.padding_idx, _weight=emb.token_weight.data,
                             device=emb.token_weight.device, dtype=emb.token_weight.dtype)
        resized = self._get_resized_embeddings(table, new_num_tokens, pad_to_multiple_of, mean_resizing)
        emb.token_weight = nn.Parameter(resized.weight.data, requires_grad=emb.token_weight.requires_grad)
        emb.vocab_size = emb.token_weight.shape[0]
        head = self._get_resized_lm_head(self.lm_head, emb.vocab_size, mean_resizing=mean_resizing)
        head.requires_grad_(self.lm_head.weight.requires_grad)
        self.set_output_embeddings(head)
        return emb.tokens

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids: Tensor | None = None, topic_ids: Tensor | None = None, labels: Tensor | None = None,
                expert_labels: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: Cache | None = None, inputs_embeds: Tensor | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None,
                logits_to_keep: int = 0, **kwargs) -> DoECausalLMOutput:
        """``input_ids, topic_ids [B, T]`` (topic -1 = none); ``labels [B, T]`` as HF (shifted inside);
        ``expert_labels``: per-token topic ids ``[B, T]`` (-1 = none; shifted like labels: the routers at
        position t are supervised with the topic of token t+1) or per-document distributions ``[B, K]``.
        Without expert_labels, topic_ids serve as the per-token labels."""
        base = self.model(input_ids=input_ids, topic_ids=topic_ids, attention_mask=attention_mask,
                          position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                          output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                          return_dict=True, reconstruct=labels is not None, **kwargs)
        hidden = base.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        routed, next_topics = list(base.router_outputs), base.next_topic_ids  # next topics: beam-aligned in the cache
        loss, aux = knowledge_outputs(self.config, routed, None if labels is None else next_token_loss(logits, labels),
                                      topic_ids, expert_labels, list(base.moe_balances))
        out = DoECausalLMOutput(loss=loss, logits=logits, cache=base.cache, hidden_states=base.hidden_states,
                                attentions=base.attentions, aux=aux, next_topic_ids=next_topics)
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()

    # ---- generation: prompt topics from the caller, generated tokens take the predicted topic ----
    def generate(self, inputs: Tensor | None = None, topic_ids: Tensor | None = None, **kwargs):
        """``GenerationMixin.generate`` with DoE's topics: ``topic_ids [B, T]`` for the prompt (default
        -1, unlabeled); each generated token takes the topic the last router predicted before it.
        With the KV cache (the default) that history lives in a :class:`DoECache`, so beam search,
        which reorders the cache, keeps it aligned; beam search without the cache is refused."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if self.config.has_topic_input and topic_ids is None and ids is not None:
            topic_ids = torch.full_like(ids, -1)
        if topic_ids is not None:
            kwargs["topic_ids"] = topic_ids
        kwargs = with_doe_cache("DoEForCausalLM.generate", kwargs, self.generation_config, self.config,
                                needs_state=self.config.has_router)
        return super().generate(inputs, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        topic_ids = model_inputs.get("topic_ids")
        if topic_ids is not None:
            model_inputs["topic_ids"] = step_topics(topic_ids, model_inputs.get("cache"), model_inputs["input_ids"].shape[1])
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                   num_new_tokens)
        if model_kwargs.get("topic_ids") is not None:
            model_kwargs["topic_ids"] = extend_history(model_kwargs["topic_ids"], outputs.next_topic_ids)
        return model_kwargs


# Checkpoints saved before the knowledge path was one module kept Z, the routers and the prior on the model itself.
# (pattern prefix, replacement prefix): the causal LM's keys start with "model.", the bare DoEModel's with nothing.
register_checkpoint_conversion_mapping("doe", [WeightRenaming(rf"^{pattern}(knowledge_state|routers\.|topic_prior\.)",
                                                              rf"{replacement}knowledge.\1")
                                               for pattern, replacement in ((r"model\.", "model."), ("", ""))],
                                       overwrite=True)
_auto.register_models()  # model type "doe" in AutoModel / AutoModelForCausalLM (doe_ext._auto)
