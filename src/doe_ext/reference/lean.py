"""Eager twins of the lean decoding step's raw ops (``doe_ext::lean_qkv``, ``lean_attention``,
``lean_mlp``), written as transformers' Llama layer computes them: RMSNorm, ``rotate_half``, SDPA with
the KV heads repeated and a boolean mask, a SiLU-gated MLP. The one departure: float64 stays float64 in
the norm (transformers' ``LlamaRMSNorm`` rounds through float32)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _rms(h: Tensor, w: Tensor, eps: float) -> Tensor:
    x = h.to(torch.promote_types(h.dtype, torch.float32))
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # x [R, heads, 1, D], cos/sin [R, D]
    D = x.shape[-1]
    return x * cos[:, None, None] + torch.cat((-x[..., D // 2:], x[..., :D // 2]), -1) * sin[:, None, None]


def lean_qkv_ref(h: Tensor, norm_weight: Tensor, eps: float, wq: Tensor, bq: Tensor | None, wk: Tensor,
                 bk: Tensor | None, wv: Tensor, bv: Tensor | None, cos: Tensor, sin: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
    R, D = h.shape[0], cos.shape[1]
    x = _rms(h, norm_weight, eps)
    q, k, v = (F.linear(x, w, b).view(R, w.shape[0] // D, 1, D) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def lean_attention_ref(h: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, wo: Tensor,
                       bo: Tensor | None) -> Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    m = None if mask is None else mask[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)
    return h + F.linear(o.reshape(h.shape[0], wo.shape[1]), wo, bo)


def lean_mlp_ref(h: Tensor, norm_weight: Tensor, eps: float, w_gate: Tensor, b_gate: Tensor | None, w_up: Tensor,
                 b_up: Tensor | None, w_down: Tensor, b_down: Tensor | None) -> Tensor:
    x = _rms(h, norm_weight, eps)
    return h + F.linear(F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up), w_down, b_down)
