"""lora_merge / lora_merge_ vs the eager W + einsum: values, gradients, gradcheck, opcheck,
torch.compile, the in-place form, bad input."""
from __future__ import annotations

import pytest
import torch

from doe_ext.ops import lora_merge, lora_merge_, specs
from doe_ext.reference import lora_merge_ref
from op_testing import DEVICE_DTYPES, DEVICES, assert_close_to_reference, leaves, assert_compile_matches_eager

MERGE = torch.ops.doe_ext.lora_merge.default
MERGE_ = torch.ops.doe_ext.lora_merge_.default
BWD = torch.ops.doe_ext.lora_merge_bwd.default

CASES = specs.CASES["lora_merge"]  # the op's cases: doe_ext.ops.specs


def make_case(name, device="cpu", dtype=torch.float32):
    return tuple(specs.make_case("lora_merge", name, device, dtype).values())


def _forward_backward(fn, weight, lora_a, lora_b, scales, grad_out):
    inputs = leaves([weight, lora_a, lora_b, scales])
    out = fn(*inputs)
    out.backward(grad_out)
    return out, [t.grad for t in inputs]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, device, dtype):
    weight, lora_a, lora_b, scales = make_case(case, device, dtype)
    grad_out = torch.randn(weight.shape, device=device, dtype=dtype)
    out, grads = _forward_backward(lora_merge, weight, lora_a, lora_b, scales, grad_out)
    ref, ref_grads = _forward_backward(lora_merge_ref, weight, lora_a, lora_b, scales, grad_out)
    f64 = [t.double() for t in (weight, lora_a, lora_b, scales, grad_out)]
    ref64, ref64_grads = _forward_backward(lora_merge_ref, *f64)
    assert out.shape == weight.shape and out.dtype == dtype
    assert_close_to_reference(out, ref, ref64, "out")
    for name, g, rg, rg64 in zip(("weight", "lora_a", "lora_b", "scales"), grads, ref_grads, ref64_grads):
        assert g.shape == rg.shape, name
        assert_close_to_reference(g, rg, rg64, f"grad {name}")


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("case", ["E3-r4-odd", "transposed-weight", "no-experts"])
def test_in_place_equals_out_of_place(case, device, dtype):
    weight, lora_a, lora_b, scales = make_case(case, device, dtype)
    expected = lora_merge(weight, lora_a, lora_b, scales)
    param = torch.nn.Parameter(weight.clone())  # a parameter: merged under no_grad, no error
    before = param.data_ptr()
    result = lora_merge_(param, lora_a, lora_b, scales)
    assert result is param and param.data_ptr() == before
    torch.testing.assert_close(param.detach(), expected)


def test_merge_leaves_weight_untouched():
    weight, lora_a, lora_b, scales = make_case("E3-r4-odd")
    before = weight.clone()
    lora_merge(weight, lora_a, lora_b, scales)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("case", [c for c in CASES if c != "empty-weight"])
def test_gradcheck_float64(case):
    inputs = leaves(make_case(case, dtype=torch.float64))
    assert torch.autograd.gradcheck(lora_merge, tuple(inputs))


@pytest.mark.parametrize("case", ["E3-r4-odd", "transposed-weight", "no-experts", "empty-weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(case, dtype):
    weight, lora_a, lora_b, scales = leaves(make_case(case, dtype=dtype))
    torch.library.opcheck(MERGE, (weight, lora_a, lora_b, scales))
    detached = [t.detach() for t in (lora_a, lora_b, scales)]
    torch.library.opcheck(MERGE_, (weight.detach().clone(), *detached))
    torch.library.opcheck(BWD, (torch.randn(weight.shape, dtype=dtype), *detached))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    case = make_case("E3-r4-odd")

    def step(weight, lora_a, lora_b, scales):
        out = lora_merge(weight, lora_a, lora_b, scales)
        return (out * out).sum()

    assert_compile_matches_eager(step, case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("merge", [lora_merge, lora_merge_], ids=["lora_merge", "lora_merge_"])
def test_bad_input_names_the_argument(device, merge):
    weight, lora_a, lora_b, scales = make_case("E3-r4-odd", device)
    name = merge.__name__
    with pytest.raises(RuntimeError, match=rf"{name}: expected `lora_a`.shape\[2\] == 9"):
        merge(weight, lora_a[..., :4], lora_b, scales)
    with pytest.raises(RuntimeError, match=r"`lora_b`.shape\[1\] == 13"):
        merge(weight, lora_a, lora_b[:, :5], scales)
    with pytest.raises(RuntimeError, match=r"`lora_b`.shape\[2\] == 4 \(r, the rank of lora_a\)"):
        merge(weight, lora_a, lora_b[..., :2], scales)
    with pytest.raises(RuntimeError, match=r"`scales`.shape\[0\] == 3"):
        merge(weight, lora_a, lora_b, scales[:2])
    with pytest.raises(RuntimeError, match=r"`lora_a` to be 3-D"):
        merge(weight, lora_a[0], lora_b, scales)
    with pytest.raises(RuntimeError, match=r"`scales` of dtype float32"):
        merge(weight, lora_a, lora_b, scales.double())
    with pytest.raises(RuntimeError, match=r"`weight` of dtype float32, float64, float16 or bfloat16 on cpu|`weight` of dtype float32, float16"):
        merge(weight.int(), lora_a, lora_b, scales)
