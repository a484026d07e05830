"""Where a decoder family keeps what DoE's knowledge path needs, read off the model itself.

:func:`derive_adapter` finds, from module names and config fields:

- the token embedding: ``model.get_input_embeddings()``;
- the decoder layers: the ``nn.ModuleList`` of ``num_hidden_layers`` layers;
- per layer, the attention (a child named ``self_attn``, ``attn``, ``self_attention`` or ``attention``)
  and the MLP (a child named ``mlp``; OPT keeps its MLP flat in the layer, and its ``fc1`` is what
  sees the MLP's input);
- the router's signal source: the attention's ``q_proj / k_proj / v_proj``, or one fused projection
  (``c_attn``, ``qkv_proj``, ``query_key_value``, ``Wqkv``) split by its real layout (:class:`FusedQKV`:
  ``[q | k | v]`` blocks, per-head interleaving, Falcon's grouped layout, from the config);
- the MLP's input projections (``fusion="concat"`` widens them).

The knowledge path wraps the MLP, so it sits on the state the MLP really sees: the post-attention
norm of a sequential block (Llama, GPT-2), the input norm of a parallel-residual block (phi, gptj,
cohere, gpt_neox, falcon), the residual stream itself in olmo2 (whose norms follow the sublayers), a
MoE block's input (mixtral, qwen2_moe). The scaled embedding of gemma keeps its scale (``DoEEmbedding``).

``ADAPTERS`` holds hand-written adapters by ``model_type``; they win over derivation (none ship: every
family of the test table derives). A custom adapter passed to ``doeify`` is saved with the knowledge
and reloaded by ``DoEWrapper.from_pretrained``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn

from doe_ext.nn.projection import is_projection, out_features

ATTENTION_NAMES = ("self_attn", "attn", "self_attention", "attention")
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe")
FLAT_MLP_INPUTS = ("fc1",)  # OPT: no MLP module; fc1 takes the MLP's input
INPUT_PROJECTIONS = ("gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "fc_in", "dense_h_to_4h", "w1", "w3")
QKV_NAMES = ("q_proj", "k_proj", "v_proj")
FUSED_QKV_NAMES = ("c_attn", "qkv_proj", "query_key_value", "Wqkv")


def get_path(root: Any, path: str) -> Any:
    """``root.a.b`` for ``path = "a.b"``; the root itself for ``""``."""
    for name in path.split(".") if path else ():
        root = getattr(root, name)
    return root


def has_path(root: Any, path: str) -> bool:
    try:
        get_path(root, path)
    except AttributeError:
        return False
    return True


@dataclass(frozen=True)
class FusedQKV:
    """A fused q/k/v projection (``path``, from the attention) and its output's layout: viewed as
    ``(..., groups, q + k + v, head_dim)``, each group holds ``q`` query heads, then ``k`` key heads,
    then ``v`` value heads. ``[q | k | v]`` blocks (GPT-2, Phi-3, Falcon multi-query) are one group;
    GPT-NeoX, BLOOM and multi-head Falcon interleave per head (``groups = heads``, 1 each); Falcon's
    new architecture has one group per key/value head. ``order``: the parts' order within a group
    (CodeGen's four model-parallel groups hold q, then v, then k)."""

    path: str
    groups: int
    q: int
    k: int
    v: int
    head_dim: int
    order: str = "qkv"

    def __post_init__(self):
        if sorted(self.order) != ["k", "q", "v"]:
            raise ValueError(f"FusedQKV: `order` must be a permutation of 'qkv', got {self.order!r}")

    @property
    def width(self) -> int:
        return self.groups * (self.q + self.k + self.v) * self.head_dim

    def part_width(self, which: str) -> int:
        return self.groups * getattr(self, which) * self.head_dim

    def split(self, out: Tensor, which: str) -> Tensor:
        """The ``which`` ("q" | "k" | "v") part of the projection's output ``(..., width)``, heads in order."""
        before = self.order[:self.order.index(which)]
        start = sum(getattr(self, p) for p in before)
        heads = out.unflatten(-1, (self.groups, self.q + self.k + self.v, self.head_dim))
        return heads[..., start:start + getattr(self, which), :].flatten(-3)


@dataclass(frozen=True)
class FamilyAdapter:
    """Where one family keeps its parts (dotted attribute paths).

    Args:
        layers: causal LM -> the ``nn.ModuleList`` of decoder layers.
        embedding: causal LM -> the token embedding (an ``nn.Embedding``).
        attention: decoder layer -> its self-attention module.
        mlp: decoder layer -> the module that takes the MLP's input (the MLP, or OPT's ``fc1``).
        mlp_inputs: MLP -> its input projections, widened by ``fusion="concat"`` (``""``: the ``mlp``
            module is itself the input projection). A layer whose MLP has none of them (a MoE block)
            cannot use ``"concat"``.
        qkv: attention -> separate (q, k, v) projections, the router's signal source.
        fused_qkv: attention -> one fused projection and its layout.
        Neither ``qkv`` nor ``fused_qkv``: only ``signal_source="none"`` works.
    """

    layers: str
    embedding: str
    attention: str
    mlp: str
    mlp_inputs: tuple[str, ...] = ()
    qkv: tuple[str, str, str] | None = None
    fused_qkv: FusedQKV | None = None

    def __post_init__(self):
        if self.qkv is not None and self.fused_qkv is not None:
            raise ValueError("FamilyAdapter: give at most one of `qkv` (separate projections) and `fused_qkv`")
        if self.qkv is not None and len(self.qkv) != 3:
            raise ValueError(f"FamilyAdapter: qkv={self.qkv!r}, expected three paths (q, k, v)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FamilyAdapter":
        d = dict(d)
        d["mlp_inputs"] = tuple(d.get("mlp_inputs", ()))
        if d.get("qkv") is not None:
            d["qkv"] = tuple(d["qkv"])
        if d.get("fused_qkv") is not None:
            d["fused_qkv"] = FusedQKV(**d["fused_qkv"])
        return cls(**d)


ADAPTERS: dict[str, FamilyAdapter] = {}


def text_config(model: nn.Module):
    """The config of the language model (a multimodal model's text part)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _fused_layout(name: str, proj: nn.Module, config) -> FusedQKV:
    """The layout of a fused projection, from the config (the module alone cannot tell them apart)."""
    nh = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // nh
    if name == "query_key_value":  # GPT-NeoX, BLOOM, Falcon
        if getattr(config, "new_decoder_architecture", False):
            nkv = config.num_kv_heads
            layout = FusedQKV(name, nkv, nh // nkv, 1, 1, hd)
        elif getattr(config, "multi_query", False):
            layout = FusedQKV(name, 1, nh, 1, 1, hd)
        else:
            layout = FusedQKV(name, nh, 1, 1, 1, hd)
    elif getattr(config, "model_type", None) == "codegen":  # four groups of [q | v | k] (its TPU shards)
        layout = FusedQKV(name, 4, nh // 4, nh // 4, nh // 4, hd, order="qvk")
    else:  # [q | k | v] blocks: GPT-2's c_attn, Phi-3's qkv_proj, MPT's Wqkv
        nkv = getattr(config, "num_key_value_heads", None) or nh
        layout = FusedQKV(name, 1, nh, nkv, nkv, hd)
    if out_features(proj) != layout.width:
        raise ValueError(f"doeify: the fused projection {name} has {out_features(proj)} outputs, but the config's "
                         f"heads give {layout} = {layout.width}; pass an adapter with fused_qkv=")
    return layout


def derive_adapter(model: nn.Module) -> FamilyAdapter:
    """Read a causal LM's layout (see the module docstring); raises ``ValueError`` saying what is missing."""
    cls = type(model).__name__
    config = text_config(model)
    embedding = model.get_input_embeddings()
    paths = {id(m): n for n, m in model.named_modules()}
    if embedding is None or id(embedding) not in paths:
        raise ValueError(f"doeify: {cls}.get_input_embeddings() gives no module of the model")
    n_layers = getattr(config, "num_hidden_layers", None)
    layers = next((n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers
                   and len(m) and any(hasattr(m[0], a) for a in ATTENTION_NAMES)), None)
    if layers is None:
        raise ValueError(f"doeify: {cls} has no nn.ModuleList of num_hidden_layers={n_layers} decoder layers with an "
                         f"attention child ({', '.join(ATTENTION_NAMES)}); pass adapter=")
    stack = get_path(model, layers)
    layer = stack[0]
    children = [n for n, _ in layer.named_children()]
    attention = next((a for a in ATTENTION_NAMES if hasattr(layer, a)), None)
    mlp = next((a for a in (*MLP_NAMES, *FLAT_MLP_INPUTS) if hasattr(layer, a)), None)
    if mlp is None:
        raise ValueError(f"doeify: cannot find the MLP of {type(layer).__name__} (children: {children}); "
                         f"expected one of {MLP_NAMES + FLAT_MLP_INPUTS}; pass adapter=")
    if mlp in FLAT_MLP_INPUTS:
        mlp_inputs: tuple[str, ...] = ("",)
    else:
        found = {n for lay in stack for n, c in get_path(lay, mlp).named_children() if is_projection(c)}
        mlp_inputs = tuple(n for n in INPUT_PROJECTIONS if n in found)
    attn = get_path(layer, attention)
    qkv = QKV_NAMES if all(hasattr(attn, n) for n in QKV_NAMES) else None
    fused = None
    if qkv is None:
        name = next((n for n in FUSED_QKV_NAMES if hasattr(attn, n)), None)
        fused = None if name is None else _fused_layout(name, getattr(attn, name), config)
    return FamilyAdapter(layers=layers, embedding=paths[id(embedding)], attention=attention, mlp=mlp,
                         mlp_inputs=mlp_inputs, qkv=qkv, fused_qkv=fused)


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """``ADAPTERS[model_type]`` if registered, else :func:`derive_adapter`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return ADAPTERS[model_type] if model_type in ADAPTERS else derive_adapter(model)
