"""The lean decoding step's raw ops (``doe_ext::lean_qkv``, ``lean_attention``, ``lean_mlp``; CPU, no
autograd) against their plain-PyTorch twins (``doe_ext.reference.lean``, transformers' Llama layer op
for op): odd sizes, GQA and MHA, padding masks, biases on and off, non-contiguous inputs (the cache's
keys and values as views of a longer buffer, transposed weights), every CPU dtype; under
``torch.compile(fullgraph=True)``; their errors name the argument. opcheck and the bad-input checks run in the self-test (tests/ops/test_selftest.py)
and the fake-check test, from doe_ext.ops.specs."""
import pytest
import torch

from doe_ext.reference import lean_attention_ref as ref_attention
from doe_ext.reference import lean_mlp_ref as ref_mlp
from doe_ext.reference import lean_qkv_ref as ref_qkv

RAW = torch.ops.doe_ext
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def rand(g, *shape, dtype, transposed=False):
    if transposed:  # the same values, laid out column-major
        return torch.randn(*shape[::-1], generator=g, dtype=torch.float64).to(dtype).t()
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def layer(dtype, R=3, d=13, H=6, G=2, D=8, I=11, T=7, bias=True, strided=False, seed=0):
    """One layer's arguments for each op, at odd sizes; ``strided``: the keys and values a window of a
    longer cache buffer, the weights transposed views, ``h`` a column slice."""
    g = torch.Generator().manual_seed(seed)

    def r(*s, **kw):
        return rand(g, *s, dtype=dtype, **kw)

    def b(n):
        return r(n) if bias else None

    h = r(R, d + 3)[:, 1:d + 1] if strided else r(R, d)
    pos = torch.arange(R, dtype=torch.float64)[:, None] + 4
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.cat((pos * inv, pos * inv), -1)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    if strided:
        buf_k, buf_v = r(R, G, T + 5, D), r(R, G, T + 5, D)
        k, v = buf_k[:, :, 2:T + 2], buf_v[:, :, 2:T + 2]
    else:
        k, v = r(R, G, T, D), r(R, G, T, D)
    mask = torch.arange(T) >= torch.arange(R)[:, None] * 2  # row i: its first 2i positions are padding
    qkv = dict(h=h, norm_weight=r(d) + 1, eps=1e-5, wq=r(H * D, d, transposed=strided), bq=b(H * D),
               wk=r(G * D, d, transposed=strided), bk=b(G * D), wv=r(G * D, d), bv=b(G * D), cos=cos, sin=sin)
    attn = dict(h=h, q=r(R, H, 1, D), k=k, v=v, mask=mask, scale=D ** -0.5, wo=r(d, H * D, transposed=strided),
                bo=b(d))
    mlp = dict(h=h, norm_weight=r(d) + 1, eps=1e-5, w_gate=r(I, d), b_gate=b(I), w_up=r(I, d, transposed=strided),
               b_up=b(I), w_down=r(d, I), b_down=b(d))
    return {"lean_qkv": (qkv, ref_qkv), "lean_attention": (attn, ref_attention), "lean_mlp": (mlp, ref_mlp)}


def as_float(t):
    return tuple(x.float() for x in t) if isinstance(t, tuple) else t.float()


@pytest.mark.parametrize("op", ["lean_qkv", "lean_attention", "lean_mlp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [
    pytest.param(dict(), id="gqa"),
    pytest.param(dict(H=5, G=5, bias=False), id="mha-nobias"),
    pytest.param(dict(R=1, T=1, H=3, G=1, D=2), id="one-row-one-position"),
    pytest.param(dict(R=9, d=37, I=29, T=19), id="wider"),
    pytest.param(dict(strided=True), id="strided"),
])
def test_matches_the_reference(op, dtype, shape):
    for seed in range(2):  # fresh inputs each round
        args, ref = layer(dtype, seed=seed, **shape)[op]
        got = getattr(RAW, op)(*args.values())
        # the reference in float64 on the same (rounded) inputs: what the op should reach up to its own rounding
        want = ref(**{k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                      for k, v in args.items()})
        tol = TOL[dtype] * 10 if dtype in (torch.bfloat16, torch.float16) else TOL[dtype]
        for g, w in zip(*[(x,) if not isinstance(x, tuple) else x for x in (got, want)]):
            assert g.dtype == dtype and g.is_contiguous()
            torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * max(1.0, w.abs().max().item()))


def test_the_mask_decides_which_positions_count():
    args, _ = layer(torch.float64)["lean_attention"]
    out = RAW.lean_attention(*args.values())
    k, v = args["k"].clone(), args["v"].clone()
    k[1, :, :2], v[1, :, :2] = 1e3, -1e3  # row 1's padding (its first 2 positions): masked, so nothing changes
    torch.testing.assert_close(RAW.lean_attention(*{**args, "k": k, "v": v}.values()), out, rtol=0, atol=0)
    k[1, :, 2] = 1e3  # an attended position: it does
    assert not torch.allclose(RAW.lean_attention(*{**args, "k": k}.values())[1], out[1])
    no_mask = RAW.lean_attention(*{**args, "mask": None}.values())  # None: every position counts
    torch.testing.assert_close(no_mask, ref_attention(**{**args, "mask": None}), rtol=1e-12, atol=1e-12)


def test_empty_batch():
    for op, (args, ref) in layer(torch.float32, R=0).items():
        got, want = getattr(RAW, op)(*args.values()), ref(**args)
        for g, w in zip(*[(x,) if not isinstance(x, tuple) else x for x in (got, want)]):
            assert g.shape == w.shape


def test_under_torch_compile_fullgraph():
    a = layer(torch.float32)

    def step(qkv, attn, mlp):
        q, k, v = RAW.lean_qkv(*qkv.values())
        h = RAW.lean_attention(attn["h"], q, torch.cat((attn["k"], k), 2), torch.cat((attn["v"], v), 2), None,
                               attn["scale"], attn["wo"], attn["bo"])
        return RAW.lean_mlp(h, *list(mlp.values())[1:])

    args = [a[op][0] for op in ("lean_qkv", "lean_attention", "lean_mlp")]
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(*args), step(*args), rtol=0, atol=0)


@pytest.mark.parametrize("op, name, value, message", [
    ("lean_qkv", "wk", lambda a: a["wk"][:, :-1], r"lean_qkv: expected `wk` of shape \[16, 13\] \[out, in\], got shape \[16, 12\]"),
    ("lean_qkv", "wv", lambda a: a["wv"][:-8], r"lean_qkv: expected `wv` of shape \[16, 13\] \[out, in\] \(the shape of wk\), got shape \[8, 13\]"),
    ("lean_qkv", "cos", lambda a: a["cos"][:, :-1], r"lean_qkv: expected `cos`.shape\[1\] \(head_dim\) even and positive, got shape \[3, 7\]"),
    ("lean_qkv", "wq", lambda a: a["wq"][:-1], r"lean_qkv: expected `wq`.shape\[0\] a positive multiple of head_dim 8 \(`cos`.shape\[1\]\), got shape \[47, 13\]"),
    ("lean_qkv", "h", lambda a: a["h"].half(), r"lean_qkv: expected `norm_weight` of dtype float16 \(the dtype of `h`\), got float32"),
    ("lean_qkv", "norm_weight", lambda a: None, r"lean_qkv: expected `norm_weight` to be a Tensor, got None"),
    ("lean_attention", "q", lambda a: a["q"][:, :5], r"lean_attention: expected `q`.shape\[1\] \(heads, 5\) a multiple of `k`.shape\[1\] \(kv_heads, 2\)"),
    ("lean_attention", "v", lambda a: a["v"][:, :, :-1], r"lean_attention: expected `v` of shape \[3, 2, 7, 8\] \[R, kv_heads, T, head_dim\] \(the shape of k\), got shape \[3, 2, 6, 8\]"),
    ("lean_attention", "mask", lambda a: a["mask"].long(), r"lean_attention: expected `mask` of dtype bool, got int64"),
    ("lean_attention", "mask", lambda a: a["mask"][:, 1:], r"lean_attention: expected `mask` of shape \[3, 7\] \[R, T\] \(T: `k`.shape\[2\]\), got shape \[3, 6\]"),
    ("lean_attention", "wo", lambda a: a["wo"].t(), r"lean_attention: expected `wo` of shape \[13, 48\] \[d, heads \* head_dim\], got shape \[48, 13\]"),
    ("lean_mlp", "w_down", lambda a: a["w_down"].t(), r"lean_mlp: expected `w_down` of shape \[13, 11\] \[d, intermediate\] \(intermediate: `w_gate`.shape\[0\]\), got shape \[11, 13\]"),
    ("lean_mlp", "b_up", lambda a: a["b_up"].double(), r"lean_mlp: expected `b_up` of dtype float32 \(the dtype of `h`\), got float64"),
    ("lean_mlp", "h", lambda a: a["h"].int(), r"lean_mlp: expected `h` of dtype float32, float64, float16 or bfloat16 on cpu, got int32"),
])
def test_bad_input_names_the_argument(op, name, value, message):
    args, _ = layer(torch.float32)[op]
    with pytest.raises(RuntimeError, match=message):
        getattr(RAW, op)(*{**args, name: value(args)}.values())


def test_no_cuda_kernel_is_said_by_name():
    args, _ = layer(torch.float32)["lean_mlp"]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), pytest.raises(RuntimeError, match=r"lean_mlp: expected `h` on cpu \(this op has no CUDA kernel\), got cuda:0"):
        RAW.lean_mlp(*[torch.empty(v.shape, dtype=v.dtype, device="cuda") if isinstance(v, torch.Tensor) else v
                       for v in args.values()])
