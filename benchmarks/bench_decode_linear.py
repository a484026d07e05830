"""decode_linear: a decoding step's linear layer (one or a few rows) against ATen's F.linear (MKL's
GEMM on the CPU). Each call runs over enough distinct weights (>= 256 MB)
that they come from memory, as a decoding step's do; the shape is SmolLM2-135M's MLP up-projection."""
from __future__ import annotations

import torch

from benchmarks.common import compare
from doe_ext.ops import decode_linear
from doe_ext.ops.specs import bench_shape


def run(device: str) -> list[dict]:
    rows_per_call, d_in, d_out, dtype = bench_shape("decode_linear", device)
    g = dict(device=device, dtype=dtype)
    copies = max(2, int(256e6 // (d_out * d_in * torch.finfo(dtype).bits // 8)))
    weights = [torch.randn(d_out, d_in, **g) for _ in range(copies)]
    out = []
    for M in rows_per_call:
        x = torch.randn(M, d_in, **g)
        out.append(compare("decode_linear", f"M={M} in={d_in} out={d_out}, {copies} weights per call", dtype, device, {
            "fused": lambda: [decode_linear(x, w) for w in weights],
            "aten": lambda: [torch.nn.functional.linear(x, w) for w in weights]}))
    return out
