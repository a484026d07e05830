"""The fake kernels run the C++ kernels' own argument checks (``torch.ops.doe_ext._check_<op>``): for every
raw op, every tensor argument bent out of shape (one more or one fewer dimension, a last dimension
one short, another dtype, the meta device, None) and every bad string or int, a call under FakeTensorMode
(what ``torch.compile`` traces with) raises exactly what the eager call raises, or both succeed with
the same output shapes."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from doe_ext.ops.specs import RAW_OPS, raw_call

RAW = torch.ops.doe_ext


def valid_calls():
    """op name -> a valid argument list of the raw op (the sample calls of doe_ext.ops.specs)."""
    return {op: list(raw_call(op).values()) for op in RAW_OPS}


def _bent(t: torch.Tensor):
    """(name, tensor) variants of ``t`` out of shape, dtype or device."""
    yield "rank+1", t.unsqueeze(0)
    if t.dim() >= 1 and t.shape[0] > 0:
        yield "rank-1", t[0]
    if t.dim() >= 1 and t.shape[-1] > 1:
        yield "last-1", t[..., :-1]
    other = {torch.float32: torch.float64, torch.float64: torch.float32, torch.int64: torch.int32,
             torch.bool: torch.int64}[t.dtype]
    yield "dtype", t.to(other)
    yield "meta", t.to("meta")
    yield "None", None  # a required tensor: refused by name; an optional one: a valid call


def mutations():
    bad_scalars = {("vae_relu_router_fwd", 10): "gelu", ("vae_relu_router_bwd", 14): "gelu",
                   ("expert_loss_fwd", 3): "max", ("expert_loss_fwd", 4): 1.5, ("dual_embedding_fwd", 4): 11,
                   ("dual_embedding_bwd", 5): -2}
    for op, args in valid_calls().items():
        yield pytest.param(op, args, id=f"{op}-valid")
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                for name, bent in _bent(a):
                    yield pytest.param(op, [*args[:i], bent, *args[i + 1:]], id=f"{op}-arg{i}-{name}")
        for (name, i), value in bad_scalars.items():
            if name == op:
                yield pytest.param(op, [*args[:i], value, *args[i + 1:]], id=f"{op}-arg{i}-{value}")


def _run(op, args):
    try:
        return getattr(RAW, op)(*args), None
    except (RuntimeError, ValueError, TypeError) as e:
        return None, f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("op, args", list(mutations()))
def test_fake_kernel_rejects_what_eager_rejects(op, args, request):
    out, err = _run(op, args)
    if request.node.callspec.id.endswith("-meta"):  # one meta argument beside real ones: always an error
        assert err is not None and "meta" in err, err
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake_out, fake_err = _run(op, fake_args)
    assert fake_err == err
    if err is None:
        outs = out if isinstance(out, tuple) else (out,)  # lora_merge_ returns None: nothing to compare
        fakes = fake_out if isinstance(fake_out, tuple) else (fake_out,)
        outs, fakes = [o for o in outs if o is not None], [f for f in fakes if f is not None]
        assert [(o.shape, o.dtype) for o in outs] == [(f.shape, f.dtype) for f in fakes]


def test_the_valid_calls_are_valid():
    for op, args in valid_calls().items():
        assert _run(op, args)[1] is None, op


@pytest.mark.parametrize("op", list(valid_calls()))
def test_every_argument_on_meta_infers_shapes(op):
    """A model built on the meta device: every op runs there (shapes only), as on the CPU."""
    args = valid_calls()[op]
    out, err = _run(op, args)
    meta_out, meta_err = _run(op, [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
    assert meta_err is None, meta_err
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
    metas = [o for o in (meta_out if isinstance(meta_out, tuple) else (meta_out,)) if o is not None]
    assert [(o.shape, o.dtype) for o in outs] == [(m.shape, m.dtype) for m in metas]
    assert all(m.device.type == "meta" for m in metas)


def test_compile_reports_the_eager_message():
    q, zk = torch.randn(3, 5), torch.randn(7, 5)
    zv = torch.randn(6, 4)  # K = 6 rows against z_key's 7
    _, eager = _run("knowledge_attention_fwd", [q, zk, zv, None, 1.0, False])
    assert eager is not None and "`z_value`.shape[0] == 7" in eager
    torch._dynamo.reset()
    fn = torch.compile(lambda q, zk, zv: RAW.knowledge_attention_fwd(q, zk, zv, None, 1.0, False)[0], fullgraph=True)
    with pytest.raises(Exception) as info:
        fn(q, zk, zv)
    assert eager.split(": ", 1)[1] in str(info.value)
