"""lora_merge: one GEMM over W (beta = 1) vs the eager W + einsum vs torch.compile of it; and the
in-place lora_merge_ (export) vs an eager in-place W += einsum."""
from __future__ import annotations

import torch

from benchmarks.common import compare
from doe_ext.ops import lora_merge, lora_merge_
from doe_ext.reference import lora_merge_ref
from doe_ext.ops.specs import bench_shape


def run(device: str) -> list[dict]:
    d_out, d_in, E, r, dtype = bench_shape("lora_merge", device)
    g = dict(device=device, dtype=dtype)
    weight = torch.randn(d_out, d_in, **g)
    lora_a = torch.randn(E, r, d_in, **g)
    lora_b = torch.randn(E, d_out, r, **g)
    scales = torch.rand(E, **g)
    compiled = torch.compile(lora_merge_ref, fullgraph=True)
    shape = f"out={d_out} in={d_in} E={E} r={r}"
    rows = [compare("lora_merge", shape, dtype, device, {
        "fused": lambda: lora_merge(weight, lora_a, lora_b, scales),
        "eager": lambda: lora_merge_ref(weight, lora_a, lora_b, scales),
        "compile": lambda: compiled(weight, lora_a, lora_b, scales)})]
    w = weight.clone()
    rows.append(compare("lora_merge_ (in place)", shape, dtype, device, {
        "fused": lambda: lora_merge_(w, lora_a, lora_b, scales),
        "eager": lambda: w.add_(torch.einsum("e,eor,eri->oi", scales, lora_b, lora_a))}))
    return rows
