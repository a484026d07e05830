"""vae_relu_router forward+backward: fused op vs the eager composite (three F.linear + elementwise)
vs torch.compile of it. Training mode (noise drawn inside each variant), ReLU gate."""
from __future__ import annotations

import torch

from benchmarks.common import compare, copy_bandwidth
from doe_ext.ops import vae_relu_router
from doe_ext.reference import vae_relu_router_ref
from doe_ext.ops.specs import bench_shape


def run(device: str) -> list[dict]:
    N, d, dz, K, dtype = bench_shape("vae_relu_router", device)
    g = dict(device=device, dtype=dtype)
    h = torch.randn(N, d, **g, requires_grad=True)
    params = [(torch.randn(dz, d, **g) * d**-0.5), torch.zeros(dz, **g), (torch.randn(dz, d, **g) * d**-0.5),
              torch.full((dz,), -2.0, **g), (torch.randn(K, dz, **g) * dz**-0.5), torch.zeros(K, **g)]
    params = [p.requires_grad_() for p in params]
    grad_gates, grad_logits = torch.randn(N, K, **g), torch.randn(N, K, **g)
    compiled = torch.compile(vae_relu_router_ref, fullgraph=True)

    def step(fn):
        def f():
            gates, logits, kl = fn(h, *params)
            torch.autograd.backward((gates, logits, kl), (grad_gates, grad_logits, torch.ones_like(kl)))
            for t in (h, *params):  # freed inside the call: peak memory counts the grads, then drops them
                t.grad = None
        return f

    variants = {"fused": step(vae_relu_router), "eager": step(vae_relu_router_ref), "compile": step(compiled)}
    extra = {}
    if device.startswith("cuda"):
        # Bytes a perfect fwd+bwd must move: read h twice (GEMMs) and write dh; gates/logits/their grads.
        elt = torch.finfo(dtype).bits // 8
        floor_bytes = (3 * N * d + 6 * N * K + 4 * N * dz) * elt
        extra["bandwidth_floor_ms"] = round(floor_bytes / copy_bandwidth(device) * 1e3, 4)
    row = compare("vae_relu_router fwd+bwd", f"N={N} d={d} dz={dz} K={K}", dtype, device, variants, extra=extra)
    if "bandwidth_floor_ms" in row:
        row["share_of_bandwidth_floor"] = round(row["bandwidth_floor_ms"] / row["ms"]["fused"], 3)
    return [row]
