"""dual_embedding forward+backward: fused op vs the eager index + cat composite vs torch.compile of it."""
from __future__ import annotations

import torch

from benchmarks.common import compare
from doe_ext.ops import dual_embedding
from doe_ext.reference import dual_embedding_ref
from doe_ext.ops.specs import bench_shape


def run(device: str) -> list[dict]:
    B, L, V, d, K, dk, dtype = bench_shape("dual_embedding", device)
    g = dict(device=device, dtype=dtype)
    token_ids = torch.randint(0, V, (B, L), device=device)
    topic_ids = torch.randint(0, K, (B, L), device=device)
    topic_ids[torch.rand(B, L, device=device) < 0.1] = -1  # some tokens without an LDA label
    tw = torch.randn(V, d, **g, requires_grad=True)
    kw = torch.randn(K, dk, **g, requires_grad=True)
    grad = torch.randn(B, L, d + dk, **g)
    compiled = torch.compile(dual_embedding_ref, fullgraph=True)

    def step(fn):
        def f():
            fn(token_ids, topic_ids, tw, kw).backward(grad)
            tw.grad = kw.grad = None  # dense [V, d] grads: allocated and written on every call
        return f

    variants = {"fused": step(dual_embedding), "eager": step(dual_embedding_ref), "compile": step(compiled)}
    return [compare("dual_embedding fwd+bwd", f"B={B} L={L} V={V} d={d} K={K} dk={dk}", dtype, device, variants)]
