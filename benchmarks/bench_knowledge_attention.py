"""knowledge_attention forward+backward: fused op vs the eager composite vs torch.compile of it."""
from __future__ import annotations

import torch

from benchmarks.common import compare, copy_bandwidth
from doe_ext.ops import knowledge_attention
from doe_ext.reference import knowledge_attention_ref
from doe_ext.ops.specs import bench_shape


def run(device: str) -> list[dict]:
    N, d, K, dtype = bench_shape("knowledge_attention", device)
    g = dict(device=device, dtype=dtype)
    h = torch.randn(N, d, **g, requires_grad=True)  # residual (H_mha)
    q = torch.randn(N, d, **g, requires_grad=True)  # H W_q
    z = (torch.randn(K, d, **g) * d**-0.5).requires_grad_()  # tied keys/values, as in DoE
    grad = torch.randn(N, d, **g)
    compiled = torch.compile(knowledge_attention_ref, fullgraph=True)

    def step(fn):
        def f():
            fn(q, z, z, residual=h).backward(grad)
            for t in (h, q, z):  # freed inside the call: peak memory counts the grads, then drops them
                t.grad = None
        return f

    variants = {"fused": step(knowledge_attention), "eager": step(knowledge_attention_ref),
                "compile": step(compiled)}
    extra = {}
    if device.startswith("cuda"):
        # Bytes a perfect fwd+bwd must move: read q, h, grad; write out, dq, dh (Z is tiny).
        floor_bytes = 6 * N * d * torch.finfo(dtype).bits // 8
        extra["bandwidth_floor_ms"] = round(floor_bytes / copy_bandwidth(device) * 1e3, 4)
    row = compare("knowledge_attention fwd+bwd", f"N={N} d={d} K={K}", dtype, device, variants, extra=extra)
    if "bandwidth_floor_ms" in row:
        row["share_of_bandwidth_floor"] = round(row["bandwidth_floor_ms"] / row["ms"]["fused"], 3)
    return [row]
