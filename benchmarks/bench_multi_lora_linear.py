"""multi_lora_linear forward+backward (mixed batch: every token its own k experts): fused op vs
the eager way (one masked pass per expert in use, PEFT's mixed batches) vs torch.compile of it.

LoRA training: the base layer is frozen (weight and bias take no gradient), x takes one (a layer
inside a model), the bank and the scales (gates) train. A second row trains the base too."""
from __future__ import annotations

import torch

from benchmarks.common import compare
from doe_ext.ops import multi_lora_linear
from doe_ext.reference import multi_lora_linear_per_expert
from doe_ext.ops.specs import bench_shape


def run(device: str) -> list[dict]:
    T, d_in, d_out, N, k, r, dtype = bench_shape("multi_lora_linear", device)
    g = dict(device=device, dtype=dtype)
    x = torch.randn(T, d_in, **g, requires_grad=True)
    weight = torch.randn(d_out, d_in, **g) * d_in**-0.5
    bias = torch.randn(d_out, **g)
    lora_a = (torch.randn(N, r, d_in, **g) * d_in**-0.5).requires_grad_()
    lora_b = (torch.randn(N, d_out, r, **g) * r**-0.5).requires_grad_()
    # k distinct experts per token, as a top-k router gives
    indices = torch.rand(T, N, device=device).argsort(-1)[:, :k].contiguous()
    scales = torch.rand(T, k, **g).requires_grad_()
    grad = torch.randn(T, d_out, **g)
    compiled = torch.compile(multi_lora_linear_per_expert)  # graph breaks at the host read of indices
    rows = []
    for train_base in (False, True):
        weight.requires_grad_(train_base)
        bias.requires_grad_(train_base)
        leaves = (x, weight, bias, lora_a, lora_b, scales)

        def step(fn):
            def f():
                fn(x, weight, bias, lora_a, lora_b, indices, scales).backward(grad)
                for t in leaves:
                    t.grad = None
            return f

        variants = {"fused": step(multi_lora_linear), "eager": step(multi_lora_linear_per_expert),
                    "compile": step(compiled)}
        name = "multi_lora_linear fwd+bwd" + (" (base trained too)" if train_base else "")
        rows.append(compare(name, f"T={T} in={d_in} out={d_out} N={N} k={k} r={r}", dtype, device, variants))
    return rows
