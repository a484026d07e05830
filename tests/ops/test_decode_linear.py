"""decode_linear vs the plain sum of products (and F.linear): values, gradients, gradcheck, opcheck,
torch.compile, layouts, bad input."""
from __future__ import annotations

import pytest
import torch

from doe_ext.ops import decode_linear, specs
from doe_ext.reference import decode_linear_ref
from op_testing import DEVICE_DTYPES, DEVICES, assert_close_to_reference, assert_compile_matches_eager, leaves

RAW = torch.ops.doe_ext.decode_linear.default

CASES = specs.CASES["decode_linear"]  # the op's cases: doe_ext.ops.specs


def make_case(name, device="cpu", dtype=torch.float32):
    return tuple(specs.make_case("decode_linear", name, device, dtype).values())


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, device, dtype):
    x, weight, bias = make_case(case, device, dtype)
    grad_out = torch.randn(*x.shape[:-1], weight.shape[0], device=device, dtype=dtype)

    def run(fn, tensors):
        inputs = leaves(tensors)
        out = fn(*inputs)
        out.backward(grad_out.to(out.dtype))
        return out, [None if t is None else t.grad for t in inputs]

    out, grads = run(decode_linear, (x, weight, bias))
    ref, ref_grads = run(decode_linear_ref, (x, weight, bias))
    ref64, ref64_grads = run(decode_linear_ref, [None if t is None else t.double() for t in (x, weight, bias)])
    assert out.shape == (*x.shape[:-1], weight.shape[0]) and out.dtype == dtype
    assert_close_to_reference(out, ref, ref64, "out")
    for name, g, rg, rg64 in zip(("x", "weight", "bias"), grads, ref_grads, ref64_grads):
        assert (g is None) == (rg is None), name
        if g is not None:
            assert_close_to_reference(g, rg, rg64, f"grad {name}")


@pytest.mark.parametrize("case", ["one-token", "three-rows", "seven-rows", "row-slice-weight"])
def test_agrees_with_f_linear_to_float32_rounding(case):
    """What a model sees when its linear layers switch to this op: F.linear's values up to rounding."""
    x, weight, bias = make_case(case)
    torch.testing.assert_close(decode_linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias),
                               rtol=1e-5, atol=1e-5)


def test_a_row_does_not_depend_on_its_neighbours():
    """Rows are independent: each row of a batch equals that row run alone (the kernel groups rows by
    four; a row's sum must not pick up another's)."""
    x, weight, bias = make_case("seven-rows")
    batch = decode_linear(x, weight, bias)
    for i in range(x.shape[0]):
        torch.testing.assert_close(batch[i], decode_linear(x[i:i + 1], weight, bias)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_an_output_is_the_same_sum_whichever_weight_rows_share_its_pass(rows, dtype):
    """At fewer than four input rows the kernel reads four weight rows at a time (one from each quarter
    of a thread's range); each output must still be the one-row sum, bit for bit: equal to the op run
    on that weight row alone. 203 rows: quarters, a remainder and (2 threads) two ranges."""
    gen = torch.Generator().manual_seed(rows)
    x, weight, bias = (torch.randn(*s, generator=gen, dtype=dtype) for s in ((rows, 131), (203, 131), (203,)))
    one_by_one = torch.cat([RAW(x, weight[o:o + 1], bias[o:o + 1]) for o in range(203)], 1)
    assert torch.equal(RAW(x, weight, bias), one_by_one)


@pytest.mark.parametrize("case", ["one-token", "seven-rows", "row-slice-weight"])
def test_without_grad_it_skips_autograd_with_the_same_values(case):
    """Under no_grad (or with no input that requires grad) the wrapper calls the kernel below autograd:
    the same values, no graph; with an input that requires grad it records one."""
    x, weight, bias = make_case(case)
    want = decode_linear_ref(x, weight, bias)
    torch.testing.assert_close(decode_linear(x, weight, bias), want)
    x, weight, bias = leaves((x, weight, bias))
    with torch.no_grad():
        out = decode_linear(x, weight, bias)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, want.detach())
    out = decode_linear(x, weight, bias)
    assert out.grad_fn is not None
    out.sum().backward()
    assert weight.grad is not None


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("no-rows", "in-zero")])
def test_gradcheck_float64(case):
    x, weight, bias = leaves(make_case(case, dtype=torch.float64))
    assert torch.autograd.gradcheck(decode_linear, (x, weight, bias))


@pytest.mark.parametrize("case", ["one-token", "four-rows", "nine-rows-gemm", "row-slice-weight", "no-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(case, dtype):
    x, weight, bias = leaves(make_case(case, dtype=dtype))
    torch.library.opcheck(RAW, (x.reshape(-1, x.shape[-1]), weight, bias))


def test_compile_fullgraph_matches_eager():
    def step(x, weight, bias):
        out = decode_linear(x, weight, bias)
        return (out * out).sum()

    assert_compile_matches_eager(step, make_case("eight-rows"))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_names_the_argument(device):
    x, weight, bias = make_case("three-rows", device)
    with pytest.raises(RuntimeError, match=r"decode_linear: expected `weight`.shape\[1\] == 64 \(in, the last dim of x\)"):
        decode_linear(x, weight[:, :10], bias)
    with pytest.raises(RuntimeError, match=r"decode_linear: expected `bias`.shape\[0\] == 129"):
        decode_linear(x, weight, bias[:5])
    with pytest.raises(RuntimeError, match=r"decode_linear: expected `weight` to be 2-D"):
        decode_linear(x, weight[0], bias)
    with pytest.raises(RuntimeError, match=r"decode_linear: expected `weight` of dtype float32 \(the dtype of `x`\)"):
        decode_linear(x, weight.double(), bias)
    with pytest.raises(RuntimeError, match=r"decode_linear: expected `x` of dtype float32, float64, float16 or bfloat16"
                                           r" on cpu|decode_linear: expected `x` of dtype float32, float16"):
        decode_linear(x.int(), weight.int(), None)
    with pytest.raises(RuntimeError, match=r"decode_linear: expected `weight` on meta \(the device of `x`\)"):
        decode_linear(x.to("meta"), weight, bias)
    with pytest.raises(TypeError, match=r"decode_linear: expected `weight` to be a Tensor, got NoneType"):
        decode_linear(x, None, bias)
    with pytest.raises(ValueError, match=r"decode_linear: expected `x` of shape \[..., in\], got a 0-D tensor"):
        decode_linear(x[0, 0], weight, bias)
