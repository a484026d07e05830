"""expert_loss forward+backward: fused op vs the eager composites (F.cross_entropy for hard labels,
log_softmax + kl_div for soft targets) vs torch.compile of them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import compare, copy_bandwidth
from doe_ext.ops import expert_loss
from doe_ext.ops.specs import bench_shape


def cross_entropy(x, y):
    return F.cross_entropy(x, y, ignore_index=-100)


def kl_composite(x, t):
    return F.kl_div(torch.log_softmax(x, -1), t, reduction="batchmean")


def run(device: str) -> list[dict]:
    N, K, dtype = bench_shape("expert_loss", device)
    g = dict(device=device, dtype=dtype)
    x = (torch.randn(N, K, **g) * 3).requires_grad_()
    labels = torch.randint(0, K, (N,), device=device)
    labels[torch.rand(N, device=device) < 0.1] = -100  # unlabeled tokens
    theta = torch.softmax(torch.randn(N, K, device=device) * 2, -1).to(dtype)
    rows = []
    for kind, target, ref in (("hard", labels, cross_entropy), ("soft", theta, kl_composite)):
        compiled = torch.compile(ref, fullgraph=True)

        def step(fn):
            def f():
                fn(x, target).backward()
                x.grad = None
            return f

        variants = {"fused": step(expert_loss), "eager": step(ref), "compile": step(compiled)}
        extra = {}
        if device.startswith("cuda"):
            elt = torch.finfo(dtype).bits // 8
            # read logits (+ soft targets), write the row gradient, read it and write grad: 4-5 N*K passes
            floor_bytes = (4 + (kind == "soft")) * N * K * elt
            extra["bandwidth_floor_ms"] = round(floor_bytes / copy_bandwidth(device) * 1e3, 4)
        row = compare(f"expert_loss {kind} fwd+bwd", f"N={N} K={K}", dtype, device, variants, extra=extra)
        if "bandwidth_floor_ms" in row:
            row["share_of_bandwidth_floor"] = round(row["bandwidth_floor_ms"] / row["ms"]["fused"], 3)
        rows.append(row)
    return rows
