"""Each op's spec, read by the op tests, the fake-check test, the fuzz suite, the benchmarks and the
self-test (:mod:`doe_ext.selftest`):

- :func:`raw_call` / :func:`public_call`: one valid call of every raw op (``torch.ops.doe_ext.*``,
  forwards and backwards) and public op, at small odd sizes, on any device and dtype. A backward's
  arguments are its forward's outputs, as autograd would pass them.
- :data:`CASES` / :func:`make_case`: each public op's table of cases (odd and empty sizes, strided,
  sliced and transposed layouts) that its tests and the self-test compare with the reference twin.
- :func:`bad_inputs`: each raw op's invalid calls, with the argument each error must name.
- :data:`BENCH_SHAPES`: each op's benchmark shape per device kind."""
from __future__ import annotations

import torch

RAW_OPS = ("knowledge_attention_fwd", "knowledge_attention_bwd", "vae_relu_router_fwd", "vae_relu_router_bwd",
           "expert_loss_fwd", "expert_loss_bwd", "dual_embedding_fwd", "dual_embedding_bwd", "lora_merge",
           "lora_merge_", "lora_merge_bwd", "multi_lora_linear_fwd", "multi_lora_linear_bwd", "decode_linear",
           "lean_qkv", "lean_attention", "lean_mlp")
#: Raw ops with a CPU kernel only (the lean decoding step of doe_ext.nn.LeanDecoder): the self-test skips
#: them on CUDA.
CPU_ONLY_OPS = ("lean_qkv", "lean_attention", "lean_mlp")


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
    H, G, D, T = 3, 1, 4, 5  # a layer's heads, kv heads, head_dim; T cached positions
    if op == "lean_qkv":
        return dict(h=rand(N, d), norm_weight=rand(d), eps=1e-5, wq=rand(H * D, d), bq=rand(H * D), wk=rand(G * D, d),
                    bk=None, wv=rand(G * D, d), bv=rand(G * D), cos=rand(N, D), sin=rand(N, D))
    if op == "lean_attention":
        mask = (torch.arange(T) >= torch.arange(N)[:, None]).to(device)  # row r: its first r positions padding
        return dict(h=rand(N, d), q=rand(N, H, 1, D), k=rand(N, G, T, D), v=rand(N, G, T, D), mask=mask, scale=0.5,
                    wo=rand(d, H * D), bo=rand(d))
    if op == "lean_mlp":
        return dict(h=rand(N, d), norm_weight=rand(d), eps=1e-5, w_gate=rand(K, d), b_gate=rand(K), w_up=rand(K, d),
                    b_up=None, w_down=rand(d, K), b_down=rand(d))
    raise KeyError(f"raw_call: no raw op {op!r}; expected one of {', '.join(RAW_OPS)}")


def bad_inputs(raw_op: str, device="cpu", dtype: torch.dtype = torch.float32):
    """``(what, call, argument)`` for each bad input of a raw op: None for each required tensor, each
    tensor on the meta device, another dtype for each floating tensor after the first (which sets the
    dtype the others must have), and an id out of range."""
    fn = getattr(torch.ops.doe_ext, raw_op)
    floating = [n for n, v in raw_call(raw_op, device, dtype).items()
                if isinstance(v, torch.Tensor) and v.is_floating_point()]
    for name, ty in schema_arguments(raw_op):
        if not ty.startswith("Tensor"):
            continue
        args = raw_call(raw_op, device, dtype)
        if args[name] is None:
            continue
        kinds = {"meta": args[name].to("meta")}
        if ty == "Tensor":
            kinds["None"] = None
        if name in floating[1:]:
            kinds["dtype"] = args[name].to(torch.float64 if dtype != torch.float64 else torch.float32)
        if name in ("token_ids", "topic_ids", "indices", "target") and not args[name].is_floating_point():
            kinds["id out of range"] = torch.full_like(args[name], 10**6)
        for what, value in kinds.items():
            bad = {**args, name: value}
            yield f"{what} `{name}`", (lambda b=bad: fn(*b.values())), name


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


def randn_layout(shape, layout: str = "contiguous", device="cpu", dtype=torch.float32,
                 scale: float = 1.0) -> torch.Tensor:
    """``scale * torch.randn(shape)`` laid out as ``layout``: "contiguous"; "row-slice" (unit stride
    along the last dim, rows further apart, a storage offset: no copy needed to read it); "strided"
    (stride 2 along the last dim); "transposed" (every dim's stride reversed). Scaled before the view
    is taken (an elementwise op on a sliced view returns a contiguous tensor)."""
    g = dict(device=device, dtype=dtype)
    *lead, last = shape
    if layout == "row-slice":
        t = (torch.randn(*lead, last + 5, **g) * scale)[..., 2:2 + last]
    elif layout == "strided":
        t = (torch.randn(*lead, 2 * last, **g) * scale)[..., ::2]
    elif layout == "transposed":
        t = (torch.randn(*reversed(shape), **g) * scale).permute(*range(len(shape) - 1, -1, -1))
    elif layout == "contiguous":
        t = torch.randn(*shape, **g) * scale
    else:
        raise ValueError(f"randn_layout: unknown `layout` {layout!r}")
    assert t.shape == tuple(shape)
    return t


# Each public op's cases: name -> the fields named in the op's first line (a comment).
CASES = {
    # lead dims of q, dk, dv, K, with residual, tied (z_key is z_value), q layout
    "knowledge_attention": {
        "K1": ((5,), 16, 16, 1, True, True, "contiguous"),
        "K7-batch-odd": ((2, 3), 33, 17, 7, True, False, "contiguous"),
        "K128-rowslice": ((37,), 64, 64, 128, True, True, "row-slice"),
        "K300-no-residual": ((3, 5, 2), 9, 9, 300, False, True, "contiguous"),
        "multi-block-strided": ((261,), 24, 40, 13, True, False, "strided"),
        "transposed": ((3, 11), 20, 6, 5, True, False, "transposed"),
        "empty": ((0,), 16, 8, 7, True, False, "contiguous"),
        "empty-batch": ((2, 0), 8, 8, 3, False, False, "contiguous"),
    },
    # lead dims of h, d, dz (latent), K, h layout, gate bias (a large negative bias gives all-zero rows)
    "vae_relu_router": {
        "K1-dz1": ((5,), 8, 1, 1, "contiguous", 0.0),
        "K17-dz7-batch": ((2, 3), 12, 7, 17, "contiguous", 0.0),
        "K128-dz9-rowslice": ((37,), 32, 9, 128, "row-slice", 0.0),
        "K256-dz5-transposed": ((3, 11), 16, 5, 256, "transposed", 0.0),
        "K17-zero-rows": ((40,), 12, 3, 17, "contiguous", -2.5),
        "empty": ((0,), 8, 3, 4, "contiguous", 0.0),
        "empty-batch": ((2, 0), 8, 3, 4, "contiguous", 0.0),
    },
    # lead dims, K, target kind ("hard" | "soft" | "soft-zeros": a sparse distribution with exact
    # zeros), share of ignored rows (hard), logits layout
    "expert_loss": {
        "K1-hard": ((5,), 1, "hard", 0.0, "contiguous"),
        "K17-hard-ignored": ((2, 9), 17, "hard", 0.3, "contiguous"),
        "K128-hard-transposed": ((7, 4), 128, "hard", 0.2, "transposed"),
        "K256-hard": ((33,), 256, "hard", 0.0, "row-slice"),
        "K17-soft": ((2, 5), 17, "soft", 0.0, "contiguous"),
        "K128-soft-zeros": ((19,), 128, "soft-zeros", 0.0, "row-slice"),
        "K256-soft": ((6,), 256, "soft", 0.0, "transposed"),
        "all-ignored": ((6,), 5, "hard", 1.0, "contiguous"),
        "empty": ((0,), 7, "hard", 0.0, "contiguous"),
        "empty-soft": ((3, 0), 7, "soft", 0.0, "contiguous"),
    },
    # id shape, V, d, K, dk, share of unlabeled topics (-1), padding_idx, table layout
    "dual_embedding": {
        "small": ((5,), 7, 4, 3, 2, 0.0, None, "contiguous"),
        "batch-odd-unlabeled": ((3, 11), 37, 13, 5, 3, 0.3, None, "contiguous"),
        "padding": ((4, 9), 20, 8, 6, 5, 0.2, 2, "contiguous"),
        "padding-negative": ((33,), 16, 6, 4, 4, 0.1, -1, "contiguous"),
        "repeats-many": ((200,), 3, 17, 2, 9, 0.25, None, "contiguous"),
        "all-unlabeled": ((2, 6), 10, 5, 4, 3, 1.0, None, "contiguous"),
        "strided-tables": ((2, 3, 5), 12, 7, 6, 4, 0.2, None, "strided"),
        "empty": ((0,), 9, 4, 3, 2, 0.0, None, "contiguous"),
        "empty-batch": ((3, 0), 9, 4, 3, 2, 0.0, 1, "contiguous"),
    },
    # out, in, E (experts merged), r, weight layout
    "lora_merge": {
        "E1-r1": (5, 7, 1, 1, "contiguous"),
        "E3-r4-odd": (13, 9, 3, 4, "contiguous"),
        "E2-r16": (31, 17, 2, 16, "contiguous"),
        "transposed-weight": (12, 10, 3, 4, "transposed"),
        "no-experts": (6, 4, 0, 4, "contiguous"),
        "empty-weight": (0, 5, 2, 3, "contiguous"),
    },
    # T, in, out, N (bank), r, k, bias, slots, x layout
    "multi_lora_linear": {
        "r1-k1": (7, 5, 3, 4, 1, 1, True, "random", "contiguous"),
        "r4-k3-odd": (33, 17, 13, 6, 4, 3, True, "random", "contiguous"),
        "r16-k3-unused-experts": (20, 9, 31, 10, 16, 3, False, "first-3-experts", "contiguous"),
        "r4-k3-wide-out": (19, 11, 300, 5, 4, 3, True, "random", "row-slice"),  # > one column block
        "repeated-expert": (9, 6, 8, 3, 2, 3, True, "same-expert", "contiguous"),
        "all-slots-empty": (6, 5, 4, 3, 4, 2, True, "empty", "contiguous"),
        "transposed-x": (10, 8, 6, 4, 3, 2, False, "random", "transposed"),
        "empty": (0, 5, 4, 3, 2, 2, True, "random", "contiguous"),
    },
    # x's shape, out, bias, layout ("transposed" / "row-slice": the weight's; "strided-x"): rows on
    # both sides of the kernel's four-row groups and of its 8-row limit (9, 17: ATen's GEMM), odd
    # widths, leading dims, layouts the kernel must read correctly
    "decode_linear": {
        "one-token": ((1, 37), 53, True, "contiguous"),
        "three-rows": ((3, 64), 129, True, "contiguous"),
        "four-rows": ((4, 17), 31, False, "contiguous"),
        "seven-rows": ((7, 33), 9, True, "contiguous"),
        "eight-rows": ((2, 4, 20), 11, True, "contiguous"),
        "nine-rows-gemm": ((9, 15), 13, True, "contiguous"),
        "seventeen-rows-gemm": ((17, 8), 5, False, "contiguous"),
        "transposed-weight": ((2, 19), 23, True, "transposed"),
        "row-slice-weight": ((5, 12), 7, True, "row-slice"),
        "strided-x": ((3, 10), 6, True, "strided-x"),
        "no-rows": ((0, 7), 4, True, "contiguous"),
        "in-zero": ((2, 0), 3, True, "contiguous"),
    },
}


def _knowledge_attention_case(case, f):
    lead, dk, dv, K, with_res, tied, layout = case
    q = randn_layout((*lead, dk), layout, **f)
    z_value = torch.randn(K, dv, **f)
    z_key = z_value if tied and dk == dv else torch.randn(K, dk, **f)
    return dict(q=q, z_key=z_key, z_value=z_value, residual=torch.randn(*lead, dv, **f) if with_res else None)


def _vae_relu_router_case(case, f):
    lead, d, dz, K, layout, gate_bias = case
    return dict(h=randn_layout((*lead, d), layout, **f), w_mu=torch.randn(dz, d, **f) * d**-0.5,
                b_mu=torch.randn(dz, **f) * 0.1, w_logvar=torch.randn(dz, d, **f) * 0.3 * d**-0.5,
                b_logvar=torch.randn(dz, **f) * 0.3 - 0.5, w_gate=torch.randn(K, dz, **f) * 0.5 * dz**-0.5,
                b_gate=torch.randn(K, **f) * 0.1 + gate_bias, noise=torch.randn(*lead, dz, **f))


def _expert_loss_case(case, f):
    lead, K, kind, ignored, layout = case
    logits = randn_layout((*lead, K), layout, **f, scale=3.0)
    if kind == "hard":
        target = torch.randint(0, K, lead, device=f["device"])
        target[torch.rand(lead, device=f["device"]) < ignored] = -100
    else:
        t = torch.rand(*lead, K, device=f["device"], dtype=torch.float64)
        if kind == "soft-zeros":
            t[t < 0.8] = 0
            t[..., 0] += 0.1  # every row keeps some mass
        target = (t / t.sum(-1, keepdim=True)).to(f["dtype"])
    return dict(logits=logits, target=target)


def _dual_embedding_case(case, f):
    shape, V, d, K, dk, unlabeled, padding_idx, layout = case
    token_ids = torch.randint(0, V, shape, device=f["device"])
    topic_ids = torch.randint(0, K, shape, device=f["device"])
    topic_ids[torch.rand(shape, device=f["device"]) < unlabeled] = -1
    if padding_idx is not None and token_ids.numel():
        token_ids.view(-1)[::3] = padding_idx % V  # make sure the padding row is hit
    # "strided": the token table with stride 2 along its width, the topic table transposed
    return dict(token_ids=token_ids, topic_ids=topic_ids, token_weight=randn_layout((V, d), layout, **f),
                topic_weight=randn_layout((K, dk), "transposed" if layout == "strided" else layout, **f),
                padding_idx=padding_idx)


def _lora_merge_case(case, f):
    d_out, d_in, E, r, layout = case
    return dict(weight=randn_layout((d_out, d_in), layout, **f), lora_a=torch.randn(E, r, d_in, **f) * d_in**-0.5,
                lora_b=torch.randn(E, d_out, r, **f) * max(r, 1)**-0.5, scales=torch.rand(E, **f) + 0.5)


def _multi_lora_linear_case(case, f):
    T, d_in, d_out, N, r, k, with_bias, slots, layout = case
    device = f["device"]
    x = randn_layout((T, d_in), layout, **f)
    weight = torch.randn(d_out, d_in, **f) * d_in**-0.5
    bias = torch.randn(d_out, **f) if with_bias else None
    lora_a = torch.randn(N, r, d_in, **f) * d_in**-0.5
    lora_b = torch.randn(N, d_out, r, **f) * d_out**-0.5
    if slots == "random":  # some empty slots too
        indices = torch.randint(-1, N, (T, k), device=device)
    elif slots == "first-3-experts":
        indices = torch.randint(0, 3, (T, k), device=device)
    elif slots == "same-expert":
        indices = torch.full((T, k), 1, device=device)
    else:
        indices = torch.full((T, k), -1, device=device)
    return dict(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, indices=indices,
                scales=torch.rand(T, k, **f) + 0.5)


def _decode_linear_case(case, f):
    shape, out, has_bias, layout = case
    x = randn_layout(shape, "strided" if layout == "strided-x" else "contiguous", **f)
    w_layout = layout if layout in ("transposed", "row-slice") else "contiguous"
    weight = randn_layout((out, shape[-1]), w_layout, **f, scale=max(shape[-1], 1) ** -0.5)
    return dict(x=x, weight=weight, bias=torch.randn(out, **f) if has_bias else None)


def make_case(op: str, name: str, device="cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Public op ``op``'s case ``name`` (:data:`CASES`): its arguments by name, in the op's order,
    drawn from torch's global generator (seed it for a fixed case)."""
    if op not in CASES:
        raise KeyError(f"make_case: no public op {op!r}; expected one of {', '.join(CASES)}")
    if name not in CASES[op]:
        raise KeyError(f"make_case: {op} has no case {name!r}; expected one of {', '.join(CASES[op])}")
    return globals()[f"_{op}_case"](CASES[op][name], dict(device=device, dtype=dtype))


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
