"""multi_lora_linear vs its plain-PyTorch twin: values and every gradient (x, weight, bias, bank,
scales), gradcheck, opcheck, torch.compile, bad input, the MultiLoRALinear module."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from doe_ext.nn import MultiLoRALinear
from doe_ext.ops import multi_lora_linear, specs
from doe_ext.reference import multi_lora_linear_per_expert, multi_lora_linear_ref
from op_testing import DEVICE_DTYPES, DEVICES, assert_close_to_reference, leaves, assert_compile_matches_eager

FWD = torch.ops.doe_ext.multi_lora_linear_fwd.default
BWD = torch.ops.doe_ext.multi_lora_linear_bwd.default

CASES = specs.CASES["multi_lora_linear"]  # the op's cases: doe_ext.ops.specs


def make_case(name, device="cpu", dtype=torch.float32):
    return tuple(specs.make_case("multi_lora_linear", name, device, dtype).values())


def _forward_backward(fn, x, weight, bias, lora_a, lora_b, indices, scales, grad_out):
    x, weight, bias, lora_a, lora_b, scales = leaves([x, weight, bias, lora_a, lora_b, scales])
    out = fn(x, weight, bias, lora_a, lora_b, indices, scales)
    out.backward(grad_out)
    return out, [t.grad for t in (x, weight, bias, lora_a, lora_b, scales) if t is not None]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, device, dtype):
    x, weight, bias, lora_a, lora_b, indices, scales = make_case(case, device, dtype)
    grad_out = torch.randn(x.shape[0], weight.shape[0], device=device, dtype=dtype)
    args = (x, weight, bias, lora_a, lora_b, indices, scales, grad_out)
    out, grads = _forward_backward(multi_lora_linear, *args)
    ref, ref_grads = _forward_backward(multi_lora_linear_ref, *args)
    f64 = [t.double() if t is not None and t.is_floating_point() else t for t in args]
    ref64, ref64_grads = _forward_backward(multi_lora_linear_ref, *f64)
    assert out.shape == (x.shape[0], weight.shape[0]) and out.dtype == dtype
    assert_close_to_reference(out, ref, ref64, "out")
    names = ["x", "weight"] + (["bias"] if bias is not None else []) + ["lora_a", "lora_b", "scales"]
    for name, g, rg, rg64 in zip(names, grads, ref_grads, ref64_grads):
        assert g.shape == rg.shape, name
        assert_close_to_reference(g, rg, rg64, f"grad {name}")


def test_unused_experts_and_empty_slots_get_zero_gradients():
    x, weight, bias, lora_a, lora_b, indices, scales = leaves(make_case("r16-k3-unused-experts"))
    indices[0, 1] = -1
    multi_lora_linear(x, weight, bias, lora_a, lora_b, indices, scales).square().sum().backward()
    assert torch.count_nonzero(lora_a.grad[3:]) == 0 and torch.count_nonzero(lora_b.grad[3:]) == 0
    assert torch.count_nonzero(lora_a.grad[:3]) > 0 and torch.count_nonzero(lora_b.grad[:3]) > 0
    assert scales.grad[0, 1] == 0 and torch.count_nonzero(scales.grad) == scales.numel() - 1


def test_weight_is_never_modified():
    x, weight, bias, lora_a, lora_b, indices, scales = leaves(make_case("r4-k3-odd"))
    before = weight.detach().clone()
    for _ in range(3):
        multi_lora_linear(x, weight, bias, lora_a, lora_b, indices, scales).sum().backward()
    assert torch.equal(weight.detach(), before)


def test_all_empty_slots_give_the_base_linear():
    x, weight, bias, lora_a, lora_b, indices, scales = make_case("all-slots-empty")
    torch.testing.assert_close(multi_lora_linear(x, weight, bias, lora_a, lora_b, indices, scales),
                               nn.functional.linear(x, weight, bias), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["r4-k3-odd", "repeated-expert", "r16-k3-unused-experts"])
def test_per_expert_eager_baseline_agrees(case):
    # the benchmark's baseline (PEFT's mixed-batch way) computes the same function
    x, weight, bias, lora_a, lora_b, indices, scales = make_case(case, dtype=torch.float64)
    torch.testing.assert_close(multi_lora_linear_per_expert(x, weight, bias, lora_a, lora_b, indices, scales),
                               multi_lora_linear_ref(x, weight, bias, lora_a, lora_b, indices, scales))


def test_result_does_not_depend_on_the_thread_count():
    x, weight, bias, lora_a, lora_b, indices, scales = make_case("r4-k3-wide-out")
    grad_out = torch.randn(x.shape[0], weight.shape[0])
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (threads, 1):
            torch.set_num_threads(n)
            runs.append(_forward_backward(multi_lora_linear, x, weight, bias, lora_a, lora_b, indices, scales, grad_out))
    finally:
        torch.set_num_threads(threads)
    (out0, g0), (out1, g1) = runs
    assert torch.equal(out0, out1)
    for name, a, b in zip(("lora_a", "lora_b", "scales"), g0[3:], g1[3:]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case", [c for c in CASES if c != "empty"])
def test_gradcheck_float64(case):
    x, weight, bias, lora_a, lora_b, indices, scales = leaves(make_case(case, dtype=torch.float64))
    big = sum(t.numel() for t in (x, weight, lora_a, lora_b)) > 3000
    fn = lambda x, w, b, a, bb, s: multi_lora_linear(x, w, b, a, bb, indices, s)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias, lora_a, lora_b, scales), fast_mode=big)


@pytest.mark.parametrize("case", ["r4-k3-odd", "r16-k3-unused-experts", "all-slots-empty", "empty"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(case, dtype):
    x, weight, bias, lora_a, lora_b, indices, scales = leaves(make_case(case, dtype=dtype))
    torch.library.opcheck(FWD, (x, weight, bias, lora_a, lora_b, indices, scales))
    _, xa = FWD(x, weight, bias, lora_a, lora_b, indices, scales)
    grad_out = torch.randn(x.shape[0], weight.shape[0], dtype=dtype)
    detached = [t.detach() for t in (x, weight, lora_a, lora_b)]
    for need_weight, need_lora in ((True, True), (False, True), (False, False)):
        torch.library.opcheck(BWD, (grad_out, *detached, indices, scales.detach(), xa.detach(), need_weight, need_lora))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    case = make_case("r4-k3-odd")
    indices = case[5]

    def step(x, weight, bias, lora_a, lora_b, scales):
        out = multi_lora_linear(x, weight, bias, lora_a, lora_b, indices, scales)
        return (out * out).sum()

    assert_compile_matches_eager(step, [case[i] for i in (0, 1, 2, 3, 4, 6)])


def test_empty_input_gives_empty_output_and_zero_bank_grads():
    x, weight, bias, lora_a, lora_b, indices, scales = leaves(make_case("empty"))
    out = multi_lora_linear(x, weight, bias, lora_a, lora_b, indices, scales)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert x.grad.shape == (0, 5) and scales.grad.shape == (0, 2)
    for t in (weight, bias, lora_a, lora_b):
        assert torch.count_nonzero(t.grad) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_bad_index_names_the_argument_and_value(device):  # CPU and CUDA raise the same error
    x, weight, bias, lora_a, lora_b, indices, scales = make_case("r4-k3-odd", device)
    bad = indices.clone()
    bad[4, 2] = 6
    with pytest.raises(RuntimeError, match=r"`indices` out of range: got 6 at \[4, 2\], expected -1 \(empty slot\) or 0 <= i < 6"):
        multi_lora_linear(x, weight, bias, lora_a, lora_b, bad, scales)
    bad[4, 2] = -3
    with pytest.raises(RuntimeError, match=r"`indices` out of range: got -3"):
        multi_lora_linear(x, weight, bias, lora_a, lora_b, bad, scales)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_shapes_name_the_argument(device):
    x, weight, bias, lora_a, lora_b, indices, scales = make_case("r4-k3-odd", device)
    with pytest.raises(RuntimeError, match=r"`weight`.shape\[1\] == 17"):
        multi_lora_linear(x, weight[:, :5], bias, lora_a, lora_b, indices, scales)
    with pytest.raises(RuntimeError, match=r"`lora_b`.shape\[2\] == 4 \(r, the rank of lora_a\)"):
        multi_lora_linear(x, weight, bias, lora_a, lora_b[..., :3], indices, scales)
    with pytest.raises(RuntimeError, match=r"`lora_a`.shape\[2\] == 17"):
        multi_lora_linear(x, weight, bias, lora_a[..., :4], lora_b, indices, scales)
    with pytest.raises(RuntimeError, match=r"`lora_b`.shape\[0\] == 6"):
        multi_lora_linear(x, weight, bias, lora_a, lora_b[:2], indices, scales)
    with pytest.raises(RuntimeError, match=r"`scales` of shape \[33, 3\]"):
        multi_lora_linear(x, weight, bias, lora_a, lora_b, indices, scales[:, :2])
    with pytest.raises(RuntimeError, match=r"`indices` of dtype int64, got int32"):
        multi_lora_linear(x, weight, bias, lora_a, lora_b, indices.int(), scales)
    with pytest.raises(RuntimeError, match=r"`indices`.shape\[0\] == 33"):
        multi_lora_linear(x, weight, bias, lora_a, lora_b, indices[:5], scales[:5])
    with pytest.raises(RuntimeError, match=r"`bias`.shape\[0\] == 13"):
        multi_lora_linear(x, weight, bias[:4], lora_a, lora_b, indices, scales)
    with pytest.raises(RuntimeError, match=r"`lora_a` of dtype float32"):
        multi_lora_linear(x, weight, bias, lora_a.double(), lora_b, indices, scales)
    with pytest.raises(RuntimeError, match=r"`x` to be 2-D"):
        multi_lora_linear(x[None], weight, bias, lora_a, lora_b, indices, scales)


def test_bank_on_another_device_names_the_argument():
    other = "cuda" if torch.cuda.is_available() else "meta"
    x, weight, bias, lora_a, lora_b, indices, scales = make_case("r1-k1")
    with pytest.raises(RuntimeError, match=r"`lora_a` on cpu"):
        multi_lora_linear(x, weight, bias, lora_a.to(other), lora_b, indices, scales)


def _module_pair(bias=True):
    base = nn.Linear(12, 10, bias=bias).double()
    bank_a = torch.randn(5, 4, 12, dtype=torch.float64) * 0.3
    bank_b = torch.randn(5, 10, 4, dtype=torch.float64) * 0.3
    return MultiLoRALinear(base, bank_a, bank_b), MultiLoRALinear(base, bank_a, bank_b, reference=True)


@pytest.mark.parametrize("bias", [True, False])
def test_module_matches_its_reference_twin(bias):
    fused, twin = _module_pair(bias)
    twin.load_state_dict(fused.state_dict())
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    indices = torch.randint(-1, 5, (2, 7, 3))
    scales = torch.rand(2, 7, 3, dtype=torch.float64)
    out, ref = fused(x, indices, scales), twin(x, indices, scales)
    assert out.shape == (2, 7, 10)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), twin.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")


def test_module_wraps_the_linear_and_starts_as_it_with_zero_b():
    base = nn.Linear(8, 6)
    layer = MultiLoRALinear(base, torch.randn(4, 2, 8), torch.zeros(4, 6, 2))
    assert layer.base_layer is base and layer.num_experts == 4 and layer.rank == 2
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x, torch.randint(-1, 4, (3, 2))), base(x), rtol=0, atol=0)


def test_module_wraps_gpt2_conv1d_as_its_linear_twin():
    """GPT-2's Conv1D stores its weight [in, out]: wrapped, it computes what the equal nn.Linear does."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 8)
    conv.bias.data.normal_()
    linear = nn.Linear(8, 6)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    a, b = torch.randn(4, 2, 8), torch.randn(4, 6, 2)
    x, idx, s = torch.randn(2, 3, 8), torch.randint(-1, 4, (2, 3, 2)), torch.rand(2, 3, 2)
    torch.testing.assert_close(MultiLoRALinear(conv, a, b)(x, idx, s), MultiLoRALinear(linear, a, b)(x, idx, s))


def test_module_rejects_bad_banks():
    base = nn.Linear(8, 6)
    with pytest.raises(ValueError, match=r"`bank_a` of shape \[N, r, 8\]"):
        MultiLoRALinear(base, torch.randn(4, 2, 7), torch.zeros(4, 6, 2))
    with pytest.raises(ValueError, match=r"`bank_b` of shape \[4, 6, 2\]"):
        MultiLoRALinear(base, torch.randn(4, 2, 8), torch.zeros(4, 6, 3))
    with pytest.raises(TypeError, match="expected `base` to be an nn.Linear or Conv1D, got Conv1d"):
        MultiLoRALinear(nn.Conv1d(8, 6, 1), torch.randn(4, 2, 8), torch.zeros(4, 6, 2))
