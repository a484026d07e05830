"""``doeify``: DoE's knowledge path (docs/design.md#the-doe-model) on top of a pretrained Hugging Face causal LM.

As PEFT does, the original modules are wrapped (kept as ``base_layer``) and swapped in with
``setattr(parent, name, wrapper)``; no transformers class is edited. Per decoder layer:

    h     = mlp_input(x)                           # what the MLP sees (post-attention or input norm), H_mha
    s     = v                                      # a forward hook on the v (or k/q) projection, fused ones split
    h_enr, e, routed = step.layer(i, h, s, ...)    # the DoE model's knowledge path (doe_ext.nn.KnowledgePath)
    x     = x + MLP(h_enr + e)                     # the wrapped MLP gets the fused input
and the token embedding becomes DoE's dual-input embedding ``proj([E_tok[token]; E_know[topic]])``.

Every added path starts as an exact no-op: ``Z = 0`` (knowledge attention adds ``softmax(.) @ 0``,
the composed expert is ``gates @ 0``), the embedding's projection is ``[I | 0]``, the topic prior is 0.
So at initialisation the wrapped model computes exactly the original logits, and fine-tuning starts
from the pretrained function. The first backward reaches ``Z``, the projection, the routers (through
the expert loss), the prior and ``W_s``; ``W_q`` and the topic table follow once ``Z`` and the
projection have moved off zero (as LoRA's ``A`` follows ``B``).
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, fields, replace

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import GenerationMixin

from doe_ext import _auto
from doe_ext.integrations.hf.adapters import (FamilyAdapter, adapter_for, get_path, has_path, out_features,
                                              text_config)
from doe_ext.models.cache import DoECache, extend_history, step_topics, with_doe_cache
from doe_ext.models.configuration_doe import DoEConfig, DoEDropInConfig, check_knowledge_options
from doe_ext.losses import knowledge_outputs, next_token_loss
from doe_ext.models.modeling_doe import DoECausalLMOutput
from doe_ext.nn.knowledge_path import KnowledgePath
from doe_ext.integrations.hf.modules import ConcatInput, DoEEmbedding, DoEMLP, ForwardState, RouterCheckpoint
from doe_ext.nn.scope import Scope

ROUTERS = ("vae_relu", "vae_softmax", "none")
KNOWLEDGE_FILE = "doe_knowledge.safetensors"
CONFIG_FILE = "doe_config.json"
DROP_IN_BASE = "base"  # save_pretrained's subfolder for the base model
DROP_IN_CARD = """# A doe_ext drop-in ({base_model_type} with DoE's knowledge path)

Written by `DoEWrapper.save_pretrained` (`pip install doe_ext`). Load it with doe_ext imported:

```python
import doe_ext
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(PATH)  # or doe_ext.integrations.hf.DoEWrapper.from_pretrained(PATH)
```

`base/` holds the base model alone, in its own layout; `doe_knowledge.safetensors` the added parameters.
"""


@dataclass(frozen=True)
class DoEifyConfig:
    """``doeify``'s options, validated once with DoEConfig's checks and choices (the router: not
    ``moe_topk``, which replaces the MLP instead of wrapping it).

    Args:
        num_topics: K, the LDA topics = knowledge blocks = rows of Z.
        topic_dim: width of the topic embedding of the dual-input embedding.
        latent_dim: width of the VAE router's latent.
        router: ``"vae_relu"`` (DoE), ``"vae_softmax"`` (Table 3 B) or ``"none"`` (knowledge attention only).
        signal_source: which attention states feed the router as a causal prefix mean: v | k | q | none.
        fusion: ``"add"``: MLP(h_enr + e); ``"concat"``: MLP([h_enr; e]) (its input projections widened).
        alpha, beta: loss weights, as in DoEConfig.
        router_decoder: the last router reconstructs the next token's embedding (adds to the KL term).
        supervise_last_router: also supervise the last router with L_expert, as in DoEConfig.
    """

    num_topics: int = DoEConfig.num_topics  # DoEConfig's defaults: one place
    topic_dim: int = DoEConfig.topic_dim
    latent_dim: int = DoEConfig.latent_dim
    router: str = DoEConfig.router
    signal_source: str = DoEConfig.signal_source
    fusion: str = DoEConfig.fusion
    alpha: float = DoEConfig.alpha
    beta: float = DoEConfig.beta
    router_decoder: bool = DoEConfig.router_decoder
    supervise_last_router: bool = DoEConfig.supervise_last_router

    def __post_init__(self):
        check_knowledge_options("DoEifyConfig", self, routers=ROUTERS)


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return get_path(root, parent), name


class DoEWrapper(nn.Module, GenerationMixin):
    """A pretrained causal LM with DoE's knowledge path (build it with :func:`doeify`).

    ``forward(input_ids, topic_ids=None, labels=None, expert_labels=None, attention_mask=None, ...)``
    returns a :class:`doe_ext.models.modeling_doe.DoECausalLMOutput` as ``DoEForCausalLM`` does: the
    composite loss ``(1-alpha)·L_ntp + alpha·L_expert (+ beta·KL)``, ``aux`` (loss parts and per-layer
    gate statistics) and ``next_topic_ids``. ``generate`` is transformers' (``GenerationMixin``, as
    ``DoEForCausalLM``'s; what the wrapper does not define it reads from the base model, as PEFT's
    wrappers do), with topic tracking: prompt topics from the caller, each generated token takes the
    last router's predicted topic.

    Added parameters: ``knowledge`` (a :class:`~doe_ext.nn.knowledge_path.KnowledgePath`: Z, the routers,
    the topic prior, as in ``DoEForCausalLM``), and inside the base model the wrapped embedding and MLPs. They save and load on
    their own (``save_knowledge`` / ``load_knowledge``) or with the base (``save_pretrained`` /
    ``from_pretrained``, the base in its original layout; also ``AutoModelForCausalLM.from_pretrained``).
    """

    config_class = DoEDropInConfig  # what save_pretrained writes: AutoModelForCausalLM loads it as this class

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, config: DoEifyConfig):
        super().__init__()
        self.doe_config = config
        num_topics, topic_dim, router, fusion = config.num_topics, config.topic_dim, config.router, config.fusion
        signal_source = config.signal_source
        self.base_model = model
        self.adapter = adapter
        self.scope: Scope[ForwardState] = Scope("doe_forward")  # each forward's state, read by the wrapped modules
        self._swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []  # (parent, name, original, wrapper)
        self._hooks: list = []

        embedding = get_path(model, adapter.embedding)
        layers = get_path(model, adapter.layers)
        w = embedding.weight
        d, K, L = text_config(model).hidden_size, num_topics, len(layers)  # OPT's embedding may be narrower than d
        has_router = router != "none"
        # Z = 0 and a zero prior: a no-op at first
        self.knowledge = KnowledgePath(d, K, L, config.latent_dim, router, config.router_decoder).to(w.device, w.dtype)

        scope = self.scope
        # The wrapped modules live in the base model; the wrapper keeps unregistered references.
        self.__dict__["doe_embedding"] = self._swap(model, adapter.embedding, DoEEmbedding(embedding, K, topic_dim, scope))
        self.__dict__["doe_layers"] = []
        for i, layer in enumerate(layers):
            attn = get_path(layer, adapter.attention)
            signal_dim = self._hook_signal(attn, i) if has_router and signal_source != "none" else 0
            if fusion == "concat":
                mlp = get_path(layer, adapter.mlp)
                inputs = [n for n in adapter.mlp_inputs if has_path(mlp, n)]
                if not inputs:
                    raise ValueError(f"doeify: fusion='concat' widens the MLP's input projections {adapter.mlp_inputs}, "
                                     f"and layer {i}'s {type(mlp).__name__} has none (a MoE block?); use fusion='add'")
                for name in inputs:
                    self._swap(layer, f"{adapter.mlp}.{name}" if name else adapter.mlp,
                               ConcatInput(get_path(mlp, name), d, scope))
            mlp = get_path(layer, adapter.mlp)
            self.doe_layers.append(self._swap(layer, adapter.mlp, DoEMLP(mlp, i, d, K, signal_dim, fusion, scope)))

    # ---- wiring ----
    def _swap(self, root: nn.Module, path: str, new: nn.Module) -> nn.Module:
        parent, name = _parent(root, path)
        self._swaps.append((parent, name, getattr(parent, name), new))
        setattr(parent, name, new)
        return new

    def _hook_signal(self, attn: nn.Module, i: int) -> int:
        """Record layer ``i``'s q/k/v projection output for the router; returns its width."""
        source = self.doe_config.signal_source
        scope, adapter = self.scope, self.adapter
        if adapter.qkv is not None:
            path = adapter.qkv["qkv".index(source)]
            if not has_path(attn, path):
                raise ValueError(f"doeify: layer {i}'s {type(attn).__name__} has no {path} (its layers' attentions differ); "
                                 f"pass signal_source='none', or an adapter")
            proj = get_path(attn, path)

            def hook(module, args, out):
                if (call := scope.get()) is not None:
                    call.signals[i] = out
            self._hooks.append(proj.register_forward_hook(hook))
            return out_features(proj)
        layout = adapter.fused_qkv
        if layout is None:
            raise ValueError(f"doeify: {type(attn).__name__} has no q/k/v projections doeify can find (separate "
                             f"q_proj/k_proj/v_proj or a fused one); pass signal_source='none', or an adapter with "
                             f"qkv= or fused_qkv=")
        proj = get_path(attn, layout.path)
        if out_features(proj) != layout.width:
            raise ValueError(f"doeify: {layout.path} of layer {i} has {out_features(proj)} outputs, its layout "
                             f"{layout} gives {layout.width}")

        def fused_hook(module, args, out):
            if (call := scope.get()) is not None:
                call.signals[i] = layout.split(out, source)
        self._hooks.append(proj.register_forward_hook(fused_hook))
        return layout.part_width(source)

    def _checkpoint_router_outputs(self) -> None:
        """Under gradient checkpointing, the routers' outputs must leave a checkpointed layer as its
        outputs: a reentrant checkpoint runs the layer without grad and keeps only what it returns, so
        anything left beside it (the expert-label and KL terms) would lose its gradient. Each decoder
        layer's checkpoint function (set by HF's ``gradient_checkpointing_enable``) is wrapped once, so
        that the layer's checkpointed function returns its router's tensors too; reentrant and
        non-reentrant checkpointing then give the gradients of none (tested)."""
        for i, layer in enumerate(get_path(self.base_model, self.adapter.layers)):
            fn = getattr(layer, "_gradient_checkpointing_func", None)
            if fn is None or getattr(fn, "_doe_wrapped", False):
                continue
            layer._gradient_checkpointing_func = RouterCheckpoint(fn, i, self.scope)

    @property
    def config(self):
        return self.base_model.config

    def get_input_embeddings(self) -> nn.Module:
        """The base model's own token embedding (its output is the token part): passed back as
        ``inputs_embeds`` with the same ``topic_ids``, it gives the logits of ``input_ids``."""
        return self.doe_embedding.base_layer

    @property
    def device(self) -> torch.device:
        return self.knowledge.knowledge_state.device

    def __getattr__(self, name: str):
        """What the wrapper does not define is the base model's (``generation_config``, ``dtype``, what
        ``generate`` asks of a model), as PEFT's wrappers read theirs."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not set yet (inside __init__)
                raise
            return getattr(self.base_model, name)

    # ---- forward, loss, generate ----
    def forward(self, input_ids: Tensor | None = None, topic_ids: Tensor | None = None, labels: Tensor | None = None,
                expert_labels: Tensor | None = None, attention_mask: Tensor | None = None, cache=None,
                use_cache: bool | None = None, inputs_embeds: Tensor | None = None, **kwargs) -> DoECausalLMOutput:
        """``input_ids, topic_ids [B, T]`` (topic -1 = none); ``labels [B, T]`` as HF (shifted inside);
        ``expert_labels``: per-token topic ids ``[B, T]`` or per-document distributions ``[B, K]``
        (default: topic_ids). ``inputs_embeds [B, T, d]`` instead of ``input_ids``: the token part,
        ``get_input_embeddings()(input_ids)``, to which the topic part is added as for ``input_ids``.
        Other keyword arguments go to the base model."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("DoEWrapper: pass exactly one of `input_ids` and `inputs_embeds`")
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        if topic_ids is not None and topic_ids.shape != shape:
            raise ValueError(f"DoEWrapper: topic_ids must have the shape of input_ids (or inputs_embeds' first two "
                             f"dimensions) {tuple(shape)}, got {tuple(topic_ids.shape)}")
        if self.training and torch.is_grad_enabled():
            self._checkpoint_router_outputs()
        if use_cache is None:
            use_cache = bool(getattr(self.base_model.config, "use_cache", False))
        if use_cache and cache is None:  # created here so the signal's running sums live on it
            cache = DoECache(config=self.base_model.config)
        lead = input_ids if input_ids is not None else inputs_embeds
        T = lead.shape[1]
        pad_mask = attention_mask[:, -T:] if attention_mask is not None and attention_mask.dim() == 2 else None
        state = ForwardState(self.knowledge.begin(topic_ids, cache, pad_mask, labels is not None), tuple(lead.shape[:2]))
        if inputs_embeds is not None:  # the token part given: the topic part is added here
            inputs_embeds = state.step.embeds = self.doe_embedding.combine(inputs_embeds, topic_ids)
        with self.scope(state):
            out = self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  cache=cache, use_cache=use_cache, **kwargs)
        routed, next_topic_ids = state.step.finish()
        logits = out.logits
        loss, aux = knowledge_outputs(self.doe_config, routed, None if labels is None else next_token_loss(logits, labels),
                                      topic_ids, expert_labels)
        return DoECausalLMOutput(loss=loss, logits=logits, cache=getattr(out, "cache", None),
                                 hidden_states=getattr(out, "hidden_states", None),
                                 attentions=getattr(out, "attentions", None), aux=aux,
                                 next_topic_ids=next_topic_ids)

    @torch.no_grad()
    def generate(self, inputs: Tensor | None = None, topic_ids: Tensor | None = None, **kwargs):
        """``GenerationMixin.generate`` (greedy, sampling, beam search; KV cache or not) with DoE's
        topics, as ``DoEForCausalLM.generate``: ``topic_ids [B, T]`` tag the prompt (None: unlabeled);
        a generated token takes the topic the last layer's router predicted at the previous position.
        They travel as a model keyword of generation (expanded with the prompts for beams and
        ``num_return_sequences``); with the cache the predictions live in a
        :class:`~doe_ext.models.cache.DoECache`, which beam search reorders. Beam search without the
        cache and assisted decoding are refused."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if ids is None:
            raise ValueError("DoEWrapper.generate: pass the prompt as token ids (inputs or input_ids)")
        if kwargs.get("assistant_model") is not None:
            raise NotImplementedError("DoEWrapper.generate: assisted decoding rewinds sequences, which the topic "
                                      "tracking does not follow; use greedy, sampling or beam search")
        kwargs = with_doe_cache("DoEWrapper.generate", kwargs, self.base_model.generation_config, self.base_model.config)
        if topic_ids is not None and topic_ids.shape != ids.shape:
            raise ValueError(f"DoEWrapper.generate: topic_ids must have the prompt's shape {tuple(ids.shape)}, "
                             f"got {tuple(topic_ids.shape)}")
        kwargs["topic_ids"] = torch.full_like(ids, -1) if topic_ids is None else topic_ids
        return super().generate(inputs, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, topic_ids=None, **kwargs):
        """The base model's inputs for one step, and the topics of the step's tokens."""
        model_inputs = self.base_model.prepare_inputs_for_generation(input_ids, **kwargs)
        if topic_ids is not None:
            new = (model_inputs.get("input_ids") if model_inputs.get("input_ids") is not None
                   else model_inputs["inputs_embeds"]).shape[1]
            model_inputs["topic_ids"] = step_topics(topic_ids, model_inputs.get("cache"), new)
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = self.base_model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                           num_new_tokens)
        if model_kwargs.get("topic_ids") is not None:  # the new token takes the topic the last router predicted
            model_kwargs["topic_ids"] = extend_history(model_kwargs["topic_ids"], outputs.next_topic_ids)
        return model_kwargs

    # ---- the added parameters ----
    def _knowledge_modules(self) -> nn.ModuleDict:
        """Every added module under a stable, family-independent name (a view, not registered)."""
        layers = nn.ModuleList()
        for mlp in self.doe_layers:
            entry = nn.ModuleDict({"knowledge_attention": mlp.knowledge_attention})
            if mlp.signal_proj is not None:
                entry["signal_proj"] = mlp.signal_proj
            concat = {name or "self": get_path(mlp.base_layer, name).extra for name in self.adapter.mlp_inputs
                      if has_path(mlp.base_layer, name) and isinstance(get_path(mlp.base_layer, name), ConcatInput)}
            if concat:
                entry["concat"] = nn.ModuleDict(concat)
            layers.append(entry)
        view = nn.ModuleDict({"routers": self.knowledge.routers, "embedding": self.doe_embedding.dual, "layers": layers})
        if self.knowledge.topic_prior is not None:
            view["topic_prior"] = self.knowledge.topic_prior
        return view

    def knowledge_state_dict(self) -> dict[str, Tensor]:
        """The added parameters only (the dual embedding's token table is the base's and is left out)."""
        sd = {"knowledge_state": self.knowledge.knowledge_state.detach()}
        for k, v in self._knowledge_modules().state_dict().items():
            if k != "embedding.token_weight":
                sd[k] = v
        return sd

    def knowledge_parameters(self) -> list[nn.Parameter]:
        """The added parameters, those :meth:`save_knowledge` writes: optimise these alone (the base's
        frozen) for a PEFT-style fine-tune."""
        named = dict(self._knowledge_modules().named_parameters())
        named.pop("embedding.token_weight", None)
        return [self.knowledge.knowledge_state, *named.values()]

    def save_knowledge(self, path: str | os.PathLike) -> None:
        """Write the added parameters (``doe_knowledge.safetensors``) and the doeify options
        (``doe_config.json``) to the folder ``path``."""
        os.makedirs(path, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.knowledge_state_dict().items()}
        options = asdict(self.doe_config)
        save_file(tensors, os.path.join(path, KNOWLEDGE_FILE), metadata={"doe_config": json.dumps(options)})
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump({**options, "model_type": self.base_model.config.model_type,
                       "adapter": self.adapter.to_dict()}, f, indent=2)

    def load_knowledge(self, path: str | os.PathLike) -> None:
        """Load what :meth:`save_knowledge` wrote (a folder, or the safetensors file itself) into this
        wrapper, which must have been built with the same options."""
        file = os.path.join(path, KNOWLEDGE_FILE) if os.path.isdir(path) else str(path)
        with safe_open(file, framework="pt") as f:
            saved_config = json.loads((f.metadata() or {}).get("doe_config", "{}"))
        defaults = {f.name: f.default for f in fields(DoEifyConfig)}  # an option added since the save has its default
        diff = {k: (saved_config.get(k, defaults[k]), v) for k, v in asdict(self.doe_config).items()
                if saved_config.get(k, defaults[k]) != v}
        if diff:
            raise ValueError(f"DoEWrapper.load_knowledge: {file} was saved with other doeify options "
                             f"(saved, here): {diff}")
        tensors = load_file(file, device=str(self.device))
        z = tensors.pop("knowledge_state", None)
        if z is not None and z.shape != self.knowledge.knowledge_state.shape:
            raise ValueError(f"DoEWrapper.load_knowledge: knowledge_state in {file} is {tuple(z.shape)}, this "
                             f"wrapper's is {tuple(self.knowledge.knowledge_state.shape)} (another base model?)")
        missing, unexpected = self._knowledge_modules().load_state_dict(tensors, strict=False)
        missing = [k for k in missing if k != "embedding.token_weight"] + (["knowledge_state"] if z is None else [])
        if missing or unexpected:
            raise ValueError(f"DoEWrapper.load_knowledge: {file} does not match this wrapper: missing {missing}, "
                             f"unexpected {unexpected}")
        with torch.no_grad():
            self.knowledge.knowledge_state.copy_(z)

    @contextlib.contextmanager
    def original_modules(self):
        """Temporarily put the original modules back (e.g. to save the base in its own layout)."""
        for parent, name, original, _ in reversed(self._swaps):
            setattr(parent, name, original)
        try:
            yield self.base_model
        finally:
            for parent, name, _, wrapper in self._swaps:
                setattr(parent, name, wrapper)

    def unload(self) -> nn.Module:
        """Remove the knowledge path: hooks off, original modules back; returns the base model."""
        for parent, name, original, _ in reversed(self._swaps):
            setattr(parent, name, original)
        for h in self._hooks:
            h.remove()
        self._swaps, self._hooks = [], []
        return self.base_model

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        """One folder: ``config.json`` of model type ``"doe_ext_drop_in"``
        (:class:`~doe_ext.models.configuration_doe.DoEDropInConfig`), the added parameters
        (:meth:`save_knowledge`) and the base model in its original layout in ``base/``. Reload it with
        :meth:`from_pretrained` or ``AutoModelForCausalLM.from_pretrained(path)``; the base alone is
        ``AutoModelForCausalLM.from_pretrained(path + "/base")``."""
        with self.original_modules() as base:
            base.save_pretrained(os.path.join(path, DROP_IN_BASE), **kwargs)
        self.save_knowledge(path)
        DoEDropInConfig(base_model_type=self.base_model.config.model_type).save_pretrained(path)
        with open(os.path.join(path, "README.md"), "w") as f:
            f.write(DROP_IN_CARD.format(base_model_type=self.base_model.config.model_type))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *args, config=None, **base_kwargs) -> "DoEWrapper":
        """Load a folder written by :meth:`save_pretrained` (also as ``AutoModelForCausalLM``'s model
        class for model type ``"doe_ext_drop_in"``, which passes ``config``; or a folder of the older
        layout, the base at its top). ``base_kwargs`` go to the base's ``from_pretrained``."""
        from transformers import AutoModelForCausalLM

        # what AutoModelForCausalLM adds for its model class (the base's own load sets them again)
        base_kwargs = {k: v for k, v in base_kwargs.items()
                       if not k.startswith("_") and k not in ("trust_remote_code", "adapter_kwargs")}
        with open(os.path.join(path, CONFIG_FILE)) as f:
            options = json.load(f)
        options.pop("model_type", None)
        adapter = options.pop("adapter", None)  # absent in folders saved before adapters were saved
        base_dir = os.path.join(path, DROP_IN_BASE)
        base = AutoModelForCausalLM.from_pretrained(base_dir if os.path.isdir(base_dir) else path, *args, **base_kwargs)
        wrapper = doeify(base, DoEifyConfig(**options),
                         adapter=None if adapter is None else FamilyAdapter.from_dict(adapter))
        wrapper.load_knowledge(path)
        return wrapper


def doeify(model: nn.Module, config: DoEifyConfig | None = None, *, adapter: FamilyAdapter | None = None,
           **options) -> DoEWrapper:
    """Add DoE's knowledge path (docs/design.md#the-doe-model) to a pretrained causal LM, in place; returns the wrapper.

    Args:
        model: a transformers causal LM (families tested: docs/drop-in.md; the layout is read off the
            model, see :mod:`doe_ext.integrations.hf.adapters`).
        config: the options (:class:`DoEifyConfig`); ``**options`` build one, or override its fields.
        adapter: where the family keeps its parts; default :func:`~doe_ext.integrations.hf.adapters.adapter_for`
            (a registered ``ADAPTERS[model_type]``, else derived from the model). Saved with the knowledge.
    """
    names = {f.name for f in fields(DoEifyConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"doeify: unknown option(s) {unknown}; the options are DoEifyConfig's: {sorted(names)}")
    config = DoEifyConfig(**options) if config is None else replace(config, **options)
    if adapter is None:
        adapter = adapter_for(model)
    if isinstance(get_path(model, adapter.embedding), DoEEmbedding):
        raise ValueError(f"doeify: {type(model).__name__} is already doeified")
    return DoEWrapper(model, adapter, config)


_auto.register_models()  # model type "doe_ext_drop_in" in AutoModelForCausalLM (doe_ext._auto)
