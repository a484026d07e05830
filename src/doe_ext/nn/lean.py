"""A decoding step without transformers' per-module Python: :class:`LeanDecoder`.

At batch 1 on the CPU, a step of SmolLM2-135M through transformers' ``forward`` spends about as long
outside its linear layers as the floor of the whole step (the weights' bytes over the memory
bandwidth): some 5,700 small ATen calls and the Python of 30 layers of modules, decorators, mask
builders and hooks (``benchmarks/results/history.md``, "Decoding against the bandwidth floor"). For the
families listed in :data:`LEAN_FAMILIES`, :class:`LeanDecoder` runs the same arithmetic for one new
token per sequence as a flat loop over the layers' weights: the same ATen ops in the same order as
transformers' modules (its RMSNorm, rotary embedding, SDPA with the same GQA and mask handling),
with q and k rotated in one call, and the linear layers through :func:`doe_ext.ops.decode_linear`.
On the CPU (``fused``, the default) each layer of plain ``nn.Linear`` projections is instead three C++
ops (``doe_ext::lean_qkv``, ``lean_attention``, ``lean_mlp``; twins in :mod:`doe_ext.reference.lean`).
Its outputs agree with the model's ``forward`` to float rounding (tests/dmoe/test_lean.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import doe_ext.ops.decode_linear  # noqa: F401  (the lean ops' fake kernels are registered there)
from doe_ext.nn.streaming import is_plain_linear

_ops = torch.ops.doe_ext

_decode_linear = _ops.decode_linear.default  # the raw op on [R, in] rows (the wrapper's checks and reshapes skipped)
_lean_qkv, _lean_attention, _lean_mlp = _ops.lean_qkv.default, _ops.lean_attention.default, _ops.lean_mlp.default

#: ``config.model_type`` values whose decoder layers :class:`LeanDecoder` mirrors (transformers' Llama layer:
#: pre-norm RMSNorm, rotary q/k, SDPA, gated MLP).
LEAN_FAMILIES = ("llama",)


def _rms(x: Tensor, norm: nn.Module) -> Tensor:
    """transformers' ``LlamaRMSNorm.forward``, op for op."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


class LeanDecoder:
    """Decoding steps of a causal LM of a family in :data:`LEAN_FAMILIES`, one token per sequence.

    Args:
        model: the ``*ForCausalLM`` (eval mode, SDPA attention, no tensor-parallel pretraining split).
        streaming: plain ``nn.Linear`` layers through :func:`~doe_ext.ops.decode_linear` (True) or
            ``F.linear``. A layer that is not exactly ``nn.Linear`` (a LoRA or expert wrapper) is called
            as a module, so its own forward runs.
        fused: with ``streaming``, each decoder layer whose seven linears are plain ``nn.Linear``, on the
            CPU in float32 or float64 with a SiLU MLP, runs as three C++ ops (``doe_ext::lean_qkv``,
            ``lean_attention``, ``lean_mlp``: the norms, rotary embedding, attention and GEMVs in plain
            loops, q/k/v and gate/up each in one parallel region) instead of ~40 ATen calls. Sums run in
            another order than ATen's: outputs agree to float rounding. Other layers take the ATen ops.

    The weights are read from the model at every call: they are the model's own parameters (nothing
    is copied), and wrappers attached after construction are seen.
    """

    @staticmethod
    def unsupported(model: nn.Module) -> str | None:
        """Why :class:`LeanDecoder` cannot run ``model``, or None when it can."""
        cfg = model.config
        if getattr(cfg, "model_type", None) not in LEAN_FAMILIES:
            return (f"LeanDecoder: model_type {getattr(cfg, 'model_type', None)!r} is not supported; "
                    f"supported: {list(LEAN_FAMILIES)}")
        if cfg._attn_implementation != "sdpa":
            return f"LeanDecoder: the model's attention implementation must be 'sdpa', got {cfg._attn_implementation!r}"
        if getattr(cfg, "pretraining_tp", 1) != 1:
            return f"LeanDecoder: `pretraining_tp` must be 1, got {cfg.pretraining_tp}"
        return None

    def __init__(self, model: nn.Module, streaming: bool = True, fused: bool = True):
        if (why := self.unsupported(model)) is not None:
            raise ValueError(why)
        cfg = model.config
        self.model, self.streaming = model, streaming
        self.fused = fused and streaming and getattr(cfg, "hidden_act", None) == "silu"
        self.inner = model.model
        attn = self.inner.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
        self.groups = attn.num_key_value_groups

    def _linear(self, layer: nn.Module, x: Tensor) -> Tensor:
        if not is_plain_linear(layer):
            return layer(x)
        if self.streaming:  # a step's rows are [R, in] throughout (below autograd inside `residual`)
            return _decode_linear(x, layer.weight, layer.bias)
        return F.linear(x, layer.weight, layer.bias)

    def _attention(self, attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache, i: int
                   ) -> Tensor:
        R, H, G, D = x.shape[0], self.heads, self.kv_heads, self.head_dim  # one position: [R, heads, 1, D] as is
        q = self._linear(attn.q_proj, x).view(R, H, 1, D)
        k = self._linear(attn.k_proj, x).view(R, G, 1, D)
        v = self._linear(attn.v_proj, x).view(R, G, 1, D)
        qk = torch.cat((q, k), 1)  # rotated together: the same elementwise ops as transformers' q and k apart
        rot = torch.cat((-qk[..., D // 2:], qk[..., :D // 2]), -1)
        qk = qk * cos + rot * sin
        k, v = cache.update(qk[:, H:], v, i)
        q = qk[:, :H]
        self._check_mask(mask, k)
        if self.groups == 1:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
        elif mask is None:  # transformers' sdpa_attention_forward: GQA in SDPA without a mask, packed with one
            o = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(q.reshape(R, G, self.groups, D), k, v, attn_mask=mask,
                                               scale=attn.scaling)
        return self._linear(attn.o_proj, o.reshape(R, H * D))

    def _mlp(self, mlp: nn.Module, x: Tensor) -> Tensor:
        return self._linear(mlp.down_proj, mlp.act_fn(self._linear(mlp.gate_proj, x)) * self._linear(mlp.up_proj, x))

    def _fused_weights(self, layer: nn.Module, h: Tensor) -> tuple | None:
        """The lean ops' weights of ``layer`` (read from the modules now), or None where the layer is not
        fusable. Through the modules' own ``_modules`` / ``_parameters`` dicts: ``nn.Module.__getattr__``
        for the ~40 lookups of a layer costs more than a layer's three ops take to dispatch."""
        if not (self.fused and h.device.type == "cpu" and h.dtype in (torch.float32, torch.float64)):
            return None
        attn, mlp = layer._modules["self_attn"], layer._modules["mlp"]
        lins = [attn._modules[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        lins += [mlp._modules[n] for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(map(is_plain_linear, lins)):
            return None
        wb = [p for x in lins for p in (x._parameters["weight"], x._parameters.get("bias"))]
        norms = [layer._modules[n] for n in ("input_layernorm", "post_attention_layernorm")]
        return (norms[0]._parameters["weight"], norms[0].variance_epsilon, *wb[:6], attn.scaling, *wb[6:8],
                norms[1]._parameters["weight"], norms[1].variance_epsilon, *wb[8:])

    @staticmethod
    def _fused_layer(w: tuple, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache, i: int,
                     mlp: bool) -> Tensor:
        """:meth:`_attention` and (``mlp``) :meth:`_mlp` with their residuals, through the lean ops
        (``w``: :meth:`_fused_weights`)."""
        q, k, v = _lean_qkv(h, *w[:8], cos, sin)
        k, v = cache.update(k, v, i)
        LeanDecoder._check_mask(mask, k)
        h = _lean_attention(h, q, k, v, mask, *w[8:11])
        return _lean_mlp(h, *w[11:]) if mlp else h

    @staticmethod
    def _check_mask(mask: Tensor | None, k: Tensor) -> None:
        if mask is not None and mask.shape[-1] != k.shape[-2]:
            raise ValueError(f"LeanDecoder: an attention mask over {mask.shape[-1]} positions for a cache of "
                             f"{k.shape[-2]} (the mask covers every position fed so far, the new one included)")

    @torch.no_grad()
    def residual(self, ids: Tensor, mask: Tensor, positions: Tensor, cache) -> Tensor:
        """Feed ``ids`` ``[R, 1]`` (one new token per sequence) at ``positions`` ``[R, 1]``, with ``mask``
        ``[R, T]`` (1 where a sequence has a token: every position fed so far, the new one included) and
        ``cache`` (a transformers ``Cache`` holding the ``T - 1`` earlier positions; the new keys and
        values are added to it). Returns the residual stream entering the last layer's MLP block,
        ``[R, d]``: ``model``'s logits are its last MLP block, final norm and head applied to it."""
        if ids.dim() != 2 or ids.shape[1] != 1:
            raise ValueError(f"LeanDecoder: `ids` must be [R, 1] (one new token per sequence), got {tuple(ids.shape)}")
        h = self.inner.embed_tokens(ids[:, 0])  # [R, d]: one position, kept 2-D throughout
        cos, sin = self.inner.rotary_emb(h, positions)  # [R, 1, D]
        attend = None if bool(mask.all()) else mask.bool()  # as transformers: None unpadded
        attend4 = None if attend is None else attend[:, None, None, :]
        cos4, sin4 = cos[:, None], sin[:, None]  # [R, 1, 1, D]: over every head of q and k
        layers = list(self.inner.layers)[:self.model.config.num_hidden_layers]
        cos2, sin2 = cos[:, 0], sin[:, 0]  # [R, D]
        with torch._C._AutoDispatchBelowAutograd():  # under no_grad: nothing to record, every op skips autograd
            for i, layer in enumerate(layers):
                last = i == len(layers) - 1
                if (w := self._fused_weights(layer, h)) is not None:
                    h = self._fused_layer(w, h, cos2, sin2, attend, cache, i, mlp=not last)
                else:
                    h = h + self._attention(layer.self_attn, _rms(h, layer.input_layernorm), cos4, sin4, attend4,
                                            cache, i)
                    if not last:
                        h = h + self._mlp(layer.mlp, _rms(h, layer.post_attention_layernorm))
                if last:
                    return h
        raise ValueError("LeanDecoder: the model has no decoder layers")

    @torch.no_grad()
    def logits(self, ids: Tensor, mask: Tensor, positions: Tensor, cache) -> Tensor:
        """The next-token logits ``[R, V]`` after feeding ``ids`` (see :meth:`residual`)."""
        r = self.residual(ids, mask, positions, cache)
        last = self.inner.layers[self.model.config.num_hidden_layers - 1]
        h = r + self._mlp(last.mlp, _rms(r, last.post_attention_layernorm))
        return self._linear(self.model.lm_head, _rms(h, self.inner.norm))
