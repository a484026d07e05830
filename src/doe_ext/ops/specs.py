"""One valid call of every raw op (``torch.ops.doe_ext.*``, forwards and backwards), at small odd
sizes, on any device and dtype: what the self-test (:mod:`doe_ext.selftest`) and the raw-op fuzz
cases (``tests/fuzz``) start from. A backward's arguments are its forward's outputs, as autograd
would pass them."""
from __future__ import annotations

import torch

RAW_OPS = ("knowledge_attention_fwd", "knowledge_attention_bwd", "vae_relu_router_fwd", "vae_relu_router_bwd",
           "expert_loss_fwd", "expert_loss_bwd", "dual_embedding_fwd", "dual_embedding_bwd", "lora_merge",
           "lora_merge_", "lora_merge_bwd", "multi_lora_linear_fwd", "multi_lora_linear_bwd", "decode_linear")


def schema_arguments(op: str) -> list[tuple[str, str]]:
    """``[(name, type), ...]`` of raw op ``op``, in schema order (type as the schema spells it)."""
    return [(a.name, str(a.type)) for a in getattr(torch.ops.doe_ext, op).default._schema.arguments]


def raw_call(op: str, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Raw op ``op``'s arguments by name, in schema order: a valid call on ``device`` in ``dtype``
    (floating tensors; ids are int64). Sizes are small and odd: 3 tokens of width 5, K = 7 blocks
    or classes, rank 2, 3 experts."""
    raw = torch.ops.doe_ext
    g = torch.Generator().manual_seed(seed)
    f = dict(device=device, dtype=dtype)

    def rand(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(**f)

    def ids(lo, hi, *shape):
        return torch.randint(lo, hi, shape, generator=g).to(device)

    N, d, K, dz, r, E = 3, 5, 7, 4, 2, 3
    if op.startswith("knowledge_attention"):
        a = dict(q=rand(N, d), z_key=rand(K, d), z_value=rand(K, d + 1), residual=rand(N, d + 1), scale=0.5,
                 return_probs=True)
        if op.endswith("fwd"):
            return a
        _, lse, probs = raw.knowledge_attention_fwd(*a.values())
        return dict(grad_out=rand(N, d + 1), q=a["q"], z_key=a["z_key"], z_value=a["z_value"], lse=lse, probs=probs,
                    scale=0.5)
    if op.startswith("vae_relu_router"):
        rng = torch.tensor([3, 5], device=device)
        a = dict(h=rand(N, d), w_mu=rand(dz, d), b_mu=rand(dz), w_logvar=rand(dz, d), b_logvar=rand(dz),
                 w_gate=rand(K, dz), b_gate=rand(K), noise=None, rng=rng, training=True, activation="relu")
        if op.endswith("fwd"):
            return a
        gates, logits, _, _, mu_logvar, _, _ = raw.vae_relu_router_fwd(*a.values())
        return dict(grad_gates=rand(N, K), grad_logits=rand(N, K), grad_kl=rand(N), grad_z=rand(N, dz), h=a["h"],
                    w_mu=a["w_mu"], w_logvar=a["w_logvar"], w_gate=a["w_gate"], mu_logvar=mu_logvar, gates=gates,
                    logits=logits, noise=None, rng=rng, training=True, activation="relu")
    if op.startswith("expert_loss"):
        a = dict(logits=rand(N, K), target=ids(0, K, N), ignore_index=-100, reduction="mean", label_smoothing=0.1,
                 keep_grad=True)
        if op.endswith("fwd"):
            return a
        _, grad_rows, weight = raw.expert_loss_fwd(*a.values())
        return dict(grad_loss=rand(), grad_rows=grad_rows, weight=weight)
    if op.startswith("dual_embedding"):
        a = dict(token_ids=ids(0, 11, 2, N), topic_ids=ids(-1, K, 2, N), token_weight=rand(11, d),
                 topic_weight=rand(K, dz), padding_idx=1)
        if op.endswith("fwd"):
            return a
        return dict(grad_out=rand(2, N, d + dz), **a)
    if op in ("lora_merge", "lora_merge_"):
        return dict(weight=rand(d + 1, d), lora_a=rand(E, r, d), lora_b=rand(E, d + 1, r), scales=rand(E))
    if op == "lora_merge_bwd":
        return dict(grad_out=rand(d + 1, d), lora_a=rand(E, r, d), lora_b=rand(E, d + 1, r), scales=rand(E))
    if op.startswith("multi_lora_linear"):
        a = dict(x=rand(N, d), weight=rand(d + 1, d), bias=rand(d + 1), lora_a=rand(E, r, d), lora_b=rand(E, d + 1, r),
                 indices=ids(-1, E, N, 2), scales=rand(N, 2))
        if op.endswith("fwd"):
            return a
        _, xa = raw.multi_lora_linear_fwd(*a.values())
        return dict(grad_out=rand(N, d + 1), **{k: v for k, v in a.items() if k != "bias"}, xa=xa,
                    need_weight_grad=True, need_lora_grad=True)
    if op == "decode_linear":
        return dict(x=rand(N, d), weight=rand(d + 2, d), bias=rand(d + 2))
    raise KeyError(f"raw_call: no raw op {op!r}; expected one of {', '.join(RAW_OPS)}")


PUBLIC_OPS = ("knowledge_attention", "vae_relu_router", "expert_loss", "dual_embedding", "lora_merge",
              "multi_lora_linear", "decode_linear")


def public_call(op: str, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Public op ``op``'s keyword arguments (``doe_ext.ops.<op>``, and its twin
    ``doe_ext.reference.<op>_ref``): the forward raw op's sample call in the public signature. The
    router gets explicit noise, so the op and its twin draw the same eps."""
    fwd = {"lora_merge": "lora_merge", "decode_linear": "decode_linear"}.get(op, f"{op}_fwd")
    a = raw_call(fwd, device, dtype, seed)
    if op == "knowledge_attention":
        a.pop("return_probs")
    elif op == "vae_relu_router":
        g = torch.Generator().manual_seed(seed + 1)
        a["noise"] = torch.randn(a["h"].shape[:-1] + a["w_mu"].shape[:1], generator=g, dtype=torch.float64).to(
            device=device, dtype=dtype)
        a.pop("rng")
    elif op == "expert_loss":
        a.pop("keep_grad")
        a["target"][0] = a["ignore_index"]  # one ignored row
    elif op not in ("dual_embedding", "lora_merge", "multi_lora_linear", "decode_linear"):
        raise KeyError(f"public_call: no public op {op!r}; expected one of {', '.join(PUBLIC_OPS)}")
    return a


# Each op's benchmark shape (benchmarks/bench_<op>.py) per device kind: (the fields, in order; shapes).
BENCH_SHAPES = {
    "knowledge_attention": ("N, d, K, dtype", {"cpu": (4096, 512, 128, torch.float32),
                                               "cuda": (16384, 4096, 128, torch.bfloat16)}),
    "vae_relu_router": ("N, d, dz, K, dtype", {"cpu": (4096, 512, 128, 128, torch.float32),
                                               "cuda": (16384, 4096, 128, 128, torch.bfloat16)}),
    "expert_loss": ("N, K, dtype", {"cpu": (16384, 128, torch.float32), "cuda": (16384 * 8, 128, torch.bfloat16)}),
    "dual_embedding": ("B, L, V, d, K, dk, dtype", {"cpu": (8, 512, 32000, 512, 128, 64, torch.float32),
                                                    "cuda": (16, 2048, 128256, 4096, 128, 64, torch.bfloat16)}),
    "lora_merge": ("out, in, E experts merged, rank, dtype", {"cpu": (1536, 576, 3, 4, torch.float32),
                                                              "cuda": (4096, 4096, 3, 16, torch.bfloat16)}),
    "multi_lora_linear": ("T tokens, in, out, N experts, k slots, rank, dtype",
                          {"cpu": (2048, 576, 1536, 64, 3, 4, torch.float32),
                           "cuda": (16384, 4096, 4096, 64, 3, 16, torch.bfloat16)}),
    # SmolLM2-135M's MLP up-projection at one token per sequence (batch 1 and 8)
    "decode_linear": ("rows per call, in, out, dtype", {"cpu": ((1, 8), 576, 1536, torch.float32),
                                                        "cuda": ((1, 8), 4096, 14336, torch.bfloat16)}),
}


def bench_shape(op: str, device) -> tuple:
    """Op ``op``'s benchmark shape on ``device`` (:data:`BENCH_SHAPES`)."""
    return BENCH_SHAPES[op][1]["cuda" if str(device).startswith("cuda") else "cpu"]
