"""Fuzz cases of every public op, raw backward op and the lean decoding step's ops (issue 14): a case is
(op, mutation, seed, sizes); the worker (``worker.py``) builds it and runs it. A mutation is valid (a
strided, expanded, zero-size, NaN or Inf input: the result must equal the reference twin's) or invalid
(a wrong rank, size, dtype, device, string, None, out-of-range id: the op must raise, naming the
argument).

``build(op, mutation, seed, sizes)`` -> ``(call, reference, expected_name)``: ``reference`` is None
for an invalid case, ``expected_name`` None for a valid one."""
from __future__ import annotations

import torch

from doe_ext import ops, reference as ref
from doe_ext.ops.specs import RAW_OPS, raw_call, schema_arguments

RAW = torch.ops.doe_ext
NAN, INF = float("nan"), float("inf")


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _dtype(seed: int) -> torch.dtype:
    """The case's floating dtype: every dtype the CPU kernels take (the half ones in float32 math)."""
    return (torch.float64, torch.float32, torch.bfloat16, torch.float16)[seed % 4]


def _rand(g, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _strided(t):
    """The same values in a non-contiguous layout (a transposed copy's transpose back)."""
    return t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() >= 2 else t[::1]


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def knowledge_attention(m, seed, s):
    g = _g(seed)
    B, T, dk, dv, K = s["a"], s["b"] + 1, s["c"] + 1, s["d"] + 1, s["e"] + 1
    dt = _dtype(seed)
    q, zk, zv, res = _rand(g, B, T, dk, dtype=dt), _rand(g, K, dk, dtype=dt), _rand(g, K, dv, dtype=dt), _rand(g, B, T, dv, dtype=dt)
    scale, bad = None, None
    if m == "strided":
        q, zv = _strided(q), _strided(zv)
    elif m == "zero_tokens":
        q, res = q[:0], res[:0]
    elif m == "nan_q":
        q = q.clone().view(-1).index_fill_(0, torch.tensor([0]), NAN).view_as(q) if q.numel() else q
    elif m == "inf_z_key":
        zk = zk.clone()
        zk[0, 0] = INF
    elif m == "scale":
        scale = 0.5
    elif m == "bad_rank_z_key":
        zk, bad = zk[None], "z_key"
    elif m == "bad_size_z_value":
        zv, bad = _rand(g, K + 1, dv, dtype=dt), "z_value"
    elif m == "bad_dk_z_key":
        zk, bad = _rand(g, K, dk + 1, dtype=dt), "z_key"
    elif m == "dtype_z_value":
        zv, bad = zv.to(torch.float32 if dt == torch.float64 else torch.float64), "z_value"
    elif m == "int_q":
        q, bad = q.long(), "q"
    elif m == "meta_z_key":
        zk, bad = _meta(zk), "z_key"
    elif m == "bad_residual":
        res, bad = _rand(g, B, T, dv + 1, dtype=dt), "residual"
    elif m == "scale_str":
        scale, bad = "x", "scale"
    elif m == "none_q":
        q, bad = None, "q"
    elif m == "dk0_q":
        q, zk, bad = q[..., :0], zk[:, :0], "q"
    return (lambda: ops.knowledge_attention(q, zk, zv, res, scale),
            None if bad else (lambda: ref.knowledge_attention_ref(q, zk, zv, res, scale)), bad)


def dual_embedding(m, seed, s):
    g = _g(seed)
    B, T, V, d, K, dk = s["a"], s["b"] + 1, s["c"] + 2, s["d"] + 1, s["e"] + 1, s["f"] + 1
    dt = _dtype(seed)
    tok = torch.randint(0, V, (B, T), generator=g)
    top = torch.randint(-1, K, (B, T), generator=g)
    tw, kw, pad, bad = _rand(g, V, d, dtype=dt), _rand(g, K, dk, dtype=dt), None, None
    if m == "strided":
        tw, kw = _strided(tw), _strided(kw)
    elif m == "expanded_huge":  # 2**31 + 8 rows that all alias one: F.embedding allocates nothing either
        tw = tw[:1].expand(2**31 + 8, d)
        tok = tok * 2**28
    elif m == "huge_ids_out_of_range":  # 2 x (2**31 + 8) expanded ids, row 0 out of range: refused before the
        tok = torch.tensor([[V], [0]]).expand(2, 2**31 + 8)  # output (tens of GB) or a copy of the ids is allocated
        top, bad = torch.zeros(1, 1, dtype=torch.long).expand(2, 2**31 + 8), "token_ids"
    elif m == "zero_tokens":
        tok, top = tok[:0], top[:0]
    elif m == "nan_table":
        tw = tw.clone()
        tw[0] = NAN
    elif m == "padding":
        pad = -1
    elif m == "token_out_of_range":
        tok, bad = tok.clone().view(-1).index_fill_(0, torch.tensor([0]), V).view_as(tok) if tok.numel() else torch.full((1, 1), V), "token_ids"
        top = top if top.numel() else torch.zeros((1, 1), dtype=torch.long)
    elif m == "topic_below_minus_one":
        top, bad = torch.full((max(B, 1), T), -2), "topic_ids"
        tok = torch.zeros_like(top)
    elif m == "shape_topic_ids":
        top, bad = top[..., :-1] if T > 1 else top[..., None], "topic_ids"
    elif m == "float_token_ids":
        tok, bad = tok.double(), "token_ids"
    elif m == "dtype_topic_weight":
        kw, bad = kw.to(torch.float32 if dt == torch.float64 else torch.float64), "topic_weight"
    elif m == "meta_topic_weight":
        kw, bad = _meta(kw), "topic_weight"
    elif m == "padding_out_of_range":
        pad, bad = V, "padding_idx"
    elif m == "padding_str":
        pad, bad = "0", "padding_idx"
    elif m == "rank_token_weight":
        tw, bad = tw[0], "token_weight"
    return (lambda: ops.dual_embedding(tok, top, tw, kw, pad),
            None if bad else (lambda: ref.dual_embedding_ref(tok, top, tw, kw, None if pad is None else pad % V)), bad)


def expert_loss(m, seed, s):
    g = _g(seed)
    N, K = s["a"] + 1, s["b"] + 1
    dt = _dtype(seed)
    logits = _rand(g, N, K, dtype=dt)
    target = torch.randint(0, K, (N,), generator=g)
    kw, bad = dict(reduction=("mean", "sum", "none")[seed % 3]), None
    if m == "soft":
        target = torch.softmax(_rand(g, N, K, dtype=dt), -1)
    elif m == "strided":
        logits = _strided(logits)
    elif m == "zero_rows":
        logits, target = logits[:0], target[:0]
    elif m == "all_ignored":
        target = torch.full((N,), -100)
        kw["reduction"] = "sum"  # "mean" of nothing: 0 here, NaN in F.cross_entropy
    elif m == "nan_logits":
        logits = logits.clone()
        logits[0, 0] = NAN
    elif m == "smoothing":
        kw["label_smoothing"] = 0.25
    elif m == "target_out_of_range":
        target, bad = torch.full((N,), K), "target"
    elif m == "target_shape":
        target, bad = target[None], "target"
    elif m == "reduction_str":
        kw, bad = dict(reduction="avg"), "reduction"
    elif m == "smoothing_range":
        kw, bad = dict(label_smoothing=2.0), "label_smoothing"
    elif m == "int_logits":
        logits, bad = logits.long(), "logits"
    elif m == "meta_target":
        target, bad = _meta(target), "target"
    elif m == "ignore_index_str":
        kw, bad = dict(ignore_index="x"), "ignore_index"
    return (lambda: ops.expert_loss(logits, target, **kw), None if bad else (lambda: ref.expert_loss_ref(logits, target, **kw)),
            bad)


def vae_relu_router(m, seed, s):
    g = _g(seed)
    N, d, dz, K = s["a"], s["b"] + 1, s["c"] + 1, s["d"] + 1
    dt = _dtype(seed)
    h = _rand(g, N, d, dtype=dt)
    w = [_rand(g, dz, d, dtype=dt), _rand(g, dz, dtype=dt), _rand(g, dz, d, dtype=dt), _rand(g, dz, dtype=dt) - 2,
         _rand(g, K, dz, dtype=dt), _rand(g, K, dtype=dt)]
    kw, bad = dict(training=False, activation="relu"), None
    if m == "noise":
        kw = dict(noise=_rand(g, N, dz, dtype=dt), training=True, activation="relu")
    elif m == "softmax":
        kw["activation"] = "softmax"
    elif m == "nan_h":
        h = h.clone()
        if N:
            h[0, 0] = NAN
    elif m == "strided":
        h, w[0] = _strided(h), _strided(w[0])
    elif m == "d0":
        h, w[0], w[2] = h[:, :0], w[0][:, :0], w[2][:, :0]
    elif m == "w_gate_dz":
        w[4], bad = _rand(g, K, dz + 1, dtype=dt), "w_gate"
    elif m == "b_mu_size":
        w[1], bad = _rand(g, dz + 1, dtype=dt), "b_mu"
    elif m == "dtype_w_logvar":
        w[2], bad = w[2].to(torch.float32 if dt == torch.float64 else torch.float64), "w_logvar"
    elif m == "activation_str":
        kw["activation"], bad = "gelu", "activation"
    elif m == "noise_shape":
        kw, bad = dict(noise=_rand(g, N, dz + 1, dtype=dt), training=True), "noise"
    elif m == "meta_w_mu":
        w[0], bad = _meta(w[0]), "w_mu"
    elif m == "training_str":
        kw["training"], bad = "yes", "training"
    return (lambda: ops.vae_relu_router(h, *w, **kw), None if bad else (lambda: ref.vae_relu_router_ref(h, *w, **kw)), bad)


def lora_merge(m, seed, s):
    g = _g(seed)
    out, inn, E, r = s["a"] + 1, s["b"] + 1, s["c"], s["d"] + 1
    dt = _dtype(seed)
    w, a, b, sc = _rand(g, out, inn, dtype=dt), _rand(g, E, r, inn, dtype=dt), _rand(g, E, out, r, dtype=dt), _rand(g, E, dtype=dt)
    bad = None
    if m == "strided":
        w, a = _strided(w), _strided(a)
    elif m == "expanded":
        a = _rand(g, 1, r, inn, dtype=dt).expand(E, r, inn)
    elif m == "nan_scales":
        sc = sc.clone()
        if E:
            sc[0] = NAN
    elif m == "lora_a_in":
        a, bad = _rand(g, E, r, inn + 1, dtype=dt), "lora_a"
    elif m == "lora_b_out":
        b, bad = _rand(g, E, out + 1, r, dtype=dt), "lora_b"
    elif m == "scales_size":
        sc, bad = _rand(g, E + 1, dtype=dt), "scales"
    elif m == "dtype_lora_b":
        b, bad = b.to(torch.float32 if dt == torch.float64 else torch.float64), "lora_b"
    elif m == "meta_scales":
        sc, bad = _meta(sc), "scales"
    elif m == "rank_weight":
        w, bad = w[0], "weight"
    elif m == "inplace_overlapping_weight":  # in place into an expanded weight: refused, as torch's own in-place ops do
        w, b = _rand(g, 1, inn, dtype=dt).expand(out + 1, inn), _rand(g, E, out + 1, r, dtype=dt)  # 2+ rows alias
        return (lambda: ops.lora_merge_(w, a, b, sc)), None, "weight"
    return (lambda: ops.lora_merge(w, a, b, sc), None if bad else (lambda: ref.lora_merge_ref(w, a, b, sc)), bad)


def multi_lora_linear(m, seed, s):
    g = _g(seed)
    T, inn, out, N, r, k = s["a"], s["b"] + 1, s["c"] + 1, s["d"] + 1, s["e"] + 1, s["f"] + 1
    dt = _dtype(seed)
    x, w, bias = _rand(g, T, inn, dtype=dt), _rand(g, out, inn, dtype=dt), _rand(g, out, dtype=dt)
    a, b = _rand(g, N, r, inn, dtype=dt), _rand(g, N, out, r, dtype=dt)
    idx = torch.randint(-1, N, (T, k), generator=g)
    sc, bad = _rand(g, T, k, dtype=dt), None
    if m == "no_bias":
        bias = None
    elif m == "strided":
        x, w = _strided(x), _strided(w)
    elif m == "expanded_huge_bank":  # 2**31 experts that alias a few: neither op nor twin may copy the bank
        a, b = a[:1].expand(2**31, r, inn), b[:1].expand(2**31, out, r)
        idx = torch.where(idx >= 0, idx * 2**26, idx)
    elif m == "nan_x":
        x = x.clone()
        if T:
            x[0, 0] = NAN
    elif m == "index_out_of_range":
        idx, bad = torch.full((max(T, 1), k), N), "indices"
        x, sc = _rand(g, max(T, 1), inn, dtype=dt), _rand(g, max(T, 1), k, dtype=dt)
    elif m == "huge_indices_out_of_range":  # [1, 2**31 + 8] expanded slots, all out of range: refused before
        x, idx = _rand(g, 1, inn, dtype=dt), torch.full((1, 1), N).expand(1, 2**31 + 8)  # anything of their size
        sc, bad = _rand(g, 1, 1, dtype=dt).expand(1, 2**31 + 8), "indices"
    elif m == "index_below":
        idx, bad = torch.full((max(T, 1), k), -2), "indices"
        x, sc = _rand(g, max(T, 1), inn, dtype=dt), _rand(g, max(T, 1), k, dtype=dt)
    elif m == "scales_shape":
        sc, bad = _rand(g, T, k + 1, dtype=dt), "scales"
    elif m == "float_indices":
        idx, bad = idx.double(), "indices"
    elif m == "weight_in":
        w, bad = _rand(g, out, inn + 1, dtype=dt), "weight"
    elif m == "meta_bias":
        bias, bad = _meta(bias), "bias"
    elif m == "none_x":
        x, bad = None, "x"
    return (lambda: ops.multi_lora_linear(x, w, bias, a, b, idx, sc),
            None if bad else (lambda: ref.multi_lora_linear_ref(x, w, bias, a, b, idx, sc)), bad)


def decode_linear(m, seed, s):
    g = _g(seed)
    M, inn, out = 2 * s["a"] + s["f"] % 2, s["b"], s["c"] + 1  # M 0..9: both sides of the kernel's 8 rows; in may be 0
    dt = _dtype(seed)
    x, w, bias, bad = _rand(g, M, inn, dtype=dt), _rand(g, out, inn, dtype=dt), _rand(g, out, dtype=dt), None
    if m == "no_bias":
        bias = None
    elif m == "strided":
        x, w = _strided(x), _strided(w)
    elif m == "batched":  # [2, M, in]: the rows of every leading dim
        x = _rand(g, 2, M, inn, dtype=dt)
    elif m == "weight_row_slice":  # rows further apart than `in`: a slice of a wider weight
        w = _rand(g, out, inn + 3, dtype=dt)[:, :inn]
    elif m == "expanded_weight":
        w = _rand(g, 1, inn, dtype=dt).expand(out, inn)
    elif m == "nan_x":
        x = x.clone()
        if M and inn:
            x[0, 0] = NAN
    elif m == "weight_in":
        w, bad = _rand(g, out, inn + 1, dtype=dt), "weight"
    elif m == "bias_size":
        bias, bad = _rand(g, out + 1, dtype=dt), "bias"
    elif m == "dtype_weight":
        w, bad = w.to(torch.float32 if dt == torch.float64 else torch.float64), "weight"
    elif m == "meta_weight":
        w, bad = _meta(w), "weight"
    elif m == "int_x":
        x, bad = torch.randint(0, 3, (max(M, 1), inn), generator=g), "x"
    elif m == "none_weight":
        w, bad = None, "weight"
    return (lambda: ops.decode_linear(x, w, bias), None if bad else (lambda: ref.decode_linear_ref(x, w, bias)), bad)


def lean_layer(m, seed, s):
    """The lean decoding step's three raw ops on one layer (CPU only), against their twins computed in
    float64 and rounded to the case's dtype."""
    g, dt = _g(seed), _dtype(seed)
    R, G, groups, D = s["a"], s["b"] % 2 + 1, s["c"] % 3 + 1, 2 * (s["d"] % 3 + 1)
    H, T, d, inner = G * groups, s["e"] + 1, s["f"] + 1, s["c"] + s["d"] + 1

    def r(*shape):
        return _rand(g, *shape, dtype=dt)

    h, cos, sin = r(R, d), r(R, D), r(R, D)
    qkv = dict(h=h, norm_weight=r(d), eps=1e-5, wq=r(H * D, d), bq=r(H * D), wk=r(G * D, d), bk=r(G * D),
               wv=r(G * D, d), bv=r(G * D), cos=cos, sin=sin)
    attn = dict(h=h, q=r(R, H, 1, D), k=r(R, G, T, D), v=r(R, G, T, D), mask=None, scale=D ** -0.5, wo=r(d, H * D),
                bo=r(d))
    mlp = dict(h=h, norm_weight=r(d), eps=1e-6, w_gate=r(inner, d), b_gate=r(inner), w_up=r(inner, d), b_up=r(inner),
               w_down=r(d, inner), b_down=r(d))
    bad = None
    if m == "no_bias":
        for a, names in ((qkv, ("bq", "bk", "bv")), (attn, ("bo",)), (mlp, ("b_gate", "b_up", "b_down"))):
            a.update(dict.fromkeys(names))
    elif m == "strided":  # the cache a window of a longer buffer, the weights transposed copies' transposes
        attn["k"], attn["v"] = r(R, G, T + 2, D)[:, :, 1:T + 1], r(R, G, T + 2, D)[:, :, 2:]
        for a in (qkv, attn, mlp):
            a.update({k: _strided(v) for k, v in a.items() if k.startswith("w")})
    elif m == "mask":  # random padding, the newest position always attended
        attn["mask"] = torch.rand(R, T, generator=g) < 0.6
        attn["mask"][:, -1] = True
    elif m == "nan_h":
        h = h.clone()
        if R:
            h[0, 0] = NAN
        qkv["h"] = attn["h"] = mlp["h"] = h
    elif m == "wk_in":
        qkv["wk"], bad = r(G * D, d + 1), "wk"
    elif m == "mask_dtype":
        attn["mask"], bad = torch.ones(R, T), "mask"
    elif m == "dtype_wo":
        attn["wo"], bad = attn["wo"].to(torch.float32 if dt == torch.float64 else torch.float64), "wo"
    elif m == "meta_cos":
        qkv["cos"], bad = _meta(cos), "cos"
    elif m == "none_w_down":
        mlp["w_down"], bad = None, "w_down"
    calls = ((RAW.lean_qkv, ref.lean_qkv_ref, qkv), (RAW.lean_attention, ref.lean_attention_ref, attn),
             (RAW.lean_mlp, ref.lean_mlp_ref, mlp))

    def twin():
        outs = [f(**{k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                     for k, v in a.items()}) for _, f, a in calls]
        return [[t.to(dt) for t in o] if isinstance(o, tuple) else o.to(dt) for o in outs]

    return (lambda: [op(*a.values()) for op, _, a in calls]), None if bad else twin, bad


def raw_backward(m, seed, s):
    """The registered backward ops called directly, with an argument the forward would never give."""
    g = _g(seed)
    N, d, K, dz = s["a"] + 1, s["b"] + 1, s["c"] + 1, s["d"] + 1
    dt = torch.float64
    if m.startswith("ka_"):
        q, zk, zv = _rand(g, N, d), _rand(g, K, d), _rand(g, K, d)
        out, lse, probs = RAW.knowledge_attention_fwd(q, zk, zv, None, 0.5, False)
        go = _rand(g, N, d)
        args = dict(grad_out=go, q=q, z_key=zk, z_value=zv, lse=lse, probs=probs)
        name = {"ka_grad_out": "grad_out", "ka_lse": "lse", "ka_meta_lse": "lse", "ka_probs": "probs"}[m]
        args[name] = (_rand(g, N + 1, d) if name == "grad_out" else _rand(g, N + 1).float() if name == "lse"
                      else _rand(g, N, K + 1))
        if m == "ka_meta_lse":
            args["lse"] = _meta(lse)
        return (lambda: RAW.knowledge_attention_bwd(*args.values(), 0.5)), None, name
    if m.startswith("vae_"):
        h = _rand(g, N, d)
        w = [_rand(g, dz, d), _rand(g, dz), _rand(g, dz, d), _rand(g, dz), _rand(g, K, dz), _rand(g, K)]
        rng = torch.tensor([3, 5])
        gates, logits, kl, z, mulv, _, _ = RAW.vae_relu_router_fwd(h, *w, None, rng, True, "relu")
        args = dict(grad_gates=_rand(g, N, K), grad_logits=None, grad_kl=None, grad_z=None, h=h, w_mu=w[0], w_logvar=w[2],
                    w_gate=w[4], mu_logvar=mulv, gates=gates, logits=logits, noise=None, rng=rng)
        name = {"vae_rng_empty": "rng", "vae_rng_one": "rng", "vae_w_gate": "w_gate", "vae_mu_logvar": "mu_logvar",
                "vae_grad_gates": "grad_gates", "vae_meta_rng": "rng"}[m]
        args[name] = {"vae_rng_empty": torch.zeros(0, dtype=torch.long), "vae_rng_one": torch.tensor([1]),
                      "vae_w_gate": _rand(g, K, dz + 2), "vae_mu_logvar": _rand(g, N, 2 * dz + 1),
                      "vae_grad_gates": _rand(g, N, K + 1), "vae_meta_rng": _meta(rng)}[m]
        return (lambda: RAW.vae_relu_router_bwd(*args.values(), True, "relu")), None, name
    if m.startswith("el_"):
        logits = _rand(g, N + 1, K)
        _, rows, weight = RAW.expert_loss_fwd(logits, torch.randint(0, K, (N + 1,), generator=g), -100, "mean", 0.0, True)
        gl = {"el_broadcast": torch.ones(1, dtype=dt), "el_dtype": torch.ones((), dtype=torch.float32),
              "el_meta": torch.ones((), dtype=dt, device="meta")}[m]
        return (lambda: RAW.expert_loss_bwd(gl, rows, weight)), None, "grad_loss"
    if m.startswith("lm_"):
        a, b, sc = _rand(g, 2, dz, d), _rand(g, 2, K, dz), _rand(g, 2)
        go = {"lm_grad_out": _rand(g, K, d + 1), "lm_meta": _meta(_rand(g, K, d))}[m]
        return (lambda: RAW.lora_merge_bwd(go, a, b, sc)), None, ("grad_out" if m == "lm_grad_out" else "lora_a")
    if m.startswith("de_"):
        tok, top = torch.randint(0, 5, (N,), generator=g), torch.randint(-1, K, (N,), generator=g)
        tw, kw = _rand(g, 5, d), _rand(g, K, dz)
        go = _rand(g, N, d + dz + (1 if m == "de_grad_out" else 0))
        if m == "de_meta":
            go = _meta(go)
        return (lambda: RAW.dual_embedding_bwd(go, tok, top, tw, kw, -1)), None, (
            "grad_out" if m == "de_grad_out" else "token_weight")
    if m.startswith("ml_"):
        x, w = _rand(g, N, d), _rand(g, K, d)
        a, b = _rand(g, 3, dz, d), _rand(g, 3, K, dz)
        idx, sc = torch.randint(-1, 3, (N, 2), generator=g), _rand(g, N, 2)
        _, xa = RAW.multi_lora_linear_fwd(x, w, None, a, b, idx, sc)
        go = _rand(g, N, K)
        if m == "ml_xa":
            xa = _rand(g, N, 2, dz + 1)
        elif m == "ml_xa_dtype":  # the forward's xa is x's dtype (float32 for half x)
            xa = xa.to(torch.float32 if xa.dtype == torch.float64 else torch.float64)
        return (lambda: RAW.multi_lora_linear_bwd(go, x, w, a, b, idx, sc, xa, True, True)), None, "xa"
    raise KeyError(m)


def _raw_argument_mutations() -> list[str]:
    """``op:kind:argument`` for every raw op and tensor argument: ``none`` (None for a required tensor,
    the others real), ``none_meta`` (None beside meta tensors: the fake kernel's path) and ``meta``
    (that one argument on the meta device, the others real)."""
    out = []
    for op in RAW_OPS:
        for name, ty in schema_arguments(op):
            if ty == "Tensor":
                out += [f"{op}:none:{name}", f"{op}:none_meta:{name}"]
            if ty.startswith("Tensor"):
                out.append(f"{op}:meta:{name}")
    return out


def raw_arguments(m, seed, s):
    """A raw op (``torch.ops.doe_ext.*``) called with None or a meta tensor where a real tensor
    belongs: refused by name (never a crash), on the kernel's path and on the fake kernel's."""
    op, kind, name = m.split(":")
    args = raw_call(op, dtype=_dtype(seed), seed=seed)
    if kind == "none_meta":
        args = {k: _meta(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    if name == "noise":  # the router's sample call draws eps from rng instead: noise [..., dz], on meta
        args[name] = torch.empty(args["h"].shape[:-1] + args["w_mu"].shape[:1], dtype=args["h"].dtype, device="meta")
    args[name] = None if kind.startswith("none") else _meta(args[name])
    return (lambda: getattr(RAW, op)(*args.values())), None, name


MUTATIONS = {
    "knowledge_attention": ["none", "strided", "zero_tokens", "nan_q", "inf_z_key", "scale", "bad_rank_z_key",
                            "bad_size_z_value", "bad_dk_z_key", "dtype_z_value", "int_q", "meta_z_key", "bad_residual",
                            "scale_str", "none_q", "dk0_q"],
    "dual_embedding": ["none", "strided", "expanded_huge", "huge_ids_out_of_range", "zero_tokens", "nan_table", "padding",
                       "token_out_of_range",
                       "topic_below_minus_one", "shape_topic_ids", "float_token_ids", "dtype_topic_weight",
                       "meta_topic_weight", "padding_out_of_range", "padding_str", "rank_token_weight"],
    "expert_loss": ["none", "soft", "strided", "zero_rows", "all_ignored", "nan_logits", "smoothing", "target_out_of_range",
                    "target_shape", "reduction_str", "smoothing_range", "int_logits", "meta_target", "ignore_index_str"],
    "vae_relu_router": ["none", "noise", "softmax", "nan_h", "strided", "d0", "w_gate_dz", "b_mu_size", "dtype_w_logvar",
                        "activation_str", "noise_shape", "meta_w_mu", "training_str"],
    "lora_merge": ["none", "strided", "expanded", "nan_scales", "lora_a_in", "lora_b_out", "scales_size", "dtype_lora_b",
                   "meta_scales", "rank_weight", "inplace_overlapping_weight"],
    "multi_lora_linear": ["none", "no_bias", "strided", "expanded_huge_bank", "nan_x", "index_out_of_range",
                          "huge_indices_out_of_range", "index_below",
                          "scales_shape", "float_indices", "weight_in", "meta_bias", "none_x"],
    "decode_linear": ["none", "no_bias", "strided", "batched", "weight_row_slice", "expanded_weight", "nan_x",
                      "weight_in", "bias_size", "dtype_weight", "meta_weight", "int_x", "none_weight"],
    "lean_layer": ["none", "no_bias", "strided", "mask", "nan_h", "wk_in", "mask_dtype", "dtype_wo", "meta_cos",
                   "none_w_down"],
    "raw_backward": ["ka_grad_out", "ka_lse", "ka_meta_lse", "ka_probs", "vae_rng_empty", "vae_rng_one", "vae_w_gate",
                     "vae_mu_logvar", "vae_grad_gates", "vae_meta_rng", "el_broadcast", "el_dtype", "el_meta",
                     "lm_grad_out", "lm_meta", "de_grad_out", "de_meta", "ml_xa", "ml_xa_dtype"],
    "raw_arguments": _raw_argument_mutations(),
}
BUILDERS = {name: globals()[name] for name in MUTATIONS}


def build(op: str, mutation: str, seed: int, sizes: dict):
    return BUILDERS[op](mutation, seed, sizes)
