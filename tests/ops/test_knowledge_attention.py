"""knowledge_attention vs its plain-PyTorch twin: values, gradients, gradcheck, opcheck,
torch.compile, bad input. One table of cases feeds every test."""
from __future__ import annotations

import pytest
import torch

import doe_ext
from doe_ext.nn import KnowledgeAttention
from doe_ext.ops import knowledge_attention, specs
from doe_ext.reference import knowledge_attention_ref
from op_testing import DEVICE_DTYPES, DEVICES, assert_close_to_reference, leaves, assert_compile_matches_eager

FWD = torch.ops.doe_ext.knowledge_attention_fwd.default
BWD = torch.ops.doe_ext.knowledge_attention_bwd.default

CASES = specs.CASES["knowledge_attention"]  # the op's cases: doe_ext.ops.specs


def make_case(name, device="cpu", dtype=torch.float32):
    return tuple(specs.make_case("knowledge_attention", name, device, dtype).values())


def _forward_backward(fn, q, z_key, z_value, residual, grad_out, tied):
    q, z_value, residual = leaves([q, z_value, residual])
    z_key = z_value if tied else leaves([z_key])[0]
    out, probs = fn(q, z_key, z_value, residual=residual, return_probs=True)
    out.backward(grad_out)
    grads = [t.grad for t in (q, z_key, z_value, residual) if t is not None]
    return out, probs, grads


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, device, dtype):
    q, z_key, z_value, residual = make_case(case, device, dtype)
    tied = z_key is z_value
    grad_out = torch.randn(*q.shape[:-1], z_value.shape[1], device=device, dtype=dtype)
    out, probs, grads = _forward_backward(knowledge_attention, q, z_key, z_value, residual, grad_out, tied)
    ref, ref_probs, ref_grads = _forward_backward(knowledge_attention_ref, q, z_key, z_value, residual, grad_out, tied)
    f64 = [t.double() if t is not None else None for t in (q, z_key, z_value, residual, grad_out)]
    ref64, ref64_probs, ref64_grads = _forward_backward(knowledge_attention_ref, *f64[:4], f64[4], tied)
    assert out.shape == (*q.shape[:-1], z_value.shape[1]) and out.dtype == dtype
    assert not probs.requires_grad
    assert_close_to_reference(out, ref, ref64, "out")
    assert_close_to_reference(probs, ref_probs, ref64_probs, "probs")
    for i, (g, rg, rg64) in enumerate(zip(grads, ref_grads, ref64_grads)):
        assert g.shape == rg.shape
        assert_close_to_reference(g, rg, rg64, f"grad {i}")


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("empty")])
def test_gradcheck_float64(case):
    q, z_key, z_value, residual = leaves(make_case(case, dtype=torch.float64))
    big = q.numel() + z_key.numel() + z_value.numel() > 4000
    fn = lambda q, zk, zv, r: knowledge_attention(q, zk, zv, residual=r, scale=0.37)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, z_key, z_value, residual), fast_mode=big)


@pytest.mark.parametrize("case", ["K7-batch-odd", "K128-rowslice", "K300-no-residual", "empty"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(case, dtype):
    q, z_key, z_value, residual = leaves(make_case(case, dtype=dtype))
    for return_probs in (False, True):
        torch.library.opcheck(FWD, (q, z_key, z_value, residual, 0.5, return_probs))
    _, lse, probs = FWD(q, z_key, z_value, residual, 0.5, True)
    grad_out = torch.randn(*q.shape[:-1], z_value.shape[1], dtype=dtype)
    for saved_probs in (probs.detach(), probs.new_empty(0)):  # kept by the forward, or rebuilt from lse
        torch.library.opcheck(BWD, (grad_out, q.detach(), z_key.detach(), z_value.detach(), lse.detach(), saved_probs, 0.5))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    q, z_key, z_value, residual = make_case("K7-batch-odd")

    def step(q, z_key, z_value, residual):
        out = knowledge_attention(q, z_key, z_value, residual=residual)
        return (out * out).sum()

    assert_compile_matches_eager(step, [q, z_key, z_value, residual])


def test_empty_input_gives_empty_output_and_zero_weight_grads():
    q, z_key, z_value, residual = leaves(make_case("empty"))
    out = knowledge_attention(q, z_key, z_value, residual)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape and residual.grad.shape == residual.shape
    assert torch.count_nonzero(z_key.grad) == 0 and torch.count_nonzero(z_value.grad) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_names_the_argument(device):
    q = torch.randn(4, 8, device=device)
    z = torch.randn(5, 8, device=device)
    with pytest.raises(RuntimeError, match=r"`z_key`.shape\[1\] == 8"):
        knowledge_attention(q, torch.randn(5, 6, device=device), z)
    with pytest.raises(RuntimeError, match=r"`z_value`.shape\[0\] == 5"):
        knowledge_attention(q, z, torch.randn(4, 8, device=device))
    with pytest.raises(RuntimeError, match=r"`z_key` to be 2-D"):
        knowledge_attention(q, z[None], z)
    with pytest.raises(RuntimeError, match=r"`z_value` of dtype float32"):
        knowledge_attention(q, z, z.double())
    with pytest.raises(RuntimeError, match=r"`q` of dtype float32, float64, float16 or bfloat16 on cpu"):
        knowledge_attention(q.to(torch.int64).cpu(), z.cpu(), z.cpu())
    with pytest.raises(RuntimeError, match=r"`residual` of shape \[4, 8\]"):
        knowledge_attention(q, z, z, residual=torch.randn(4, 7, device=device))
    with pytest.raises(RuntimeError, match=r"at least one knowledge block"):
        knowledge_attention(q, z[:0], z[:0])


def test_z_on_another_device_names_the_argument():
    other = "cuda" if torch.cuda.is_available() else "meta"
    q = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"`z_key` on cpu"):
        knowledge_attention(q, torch.randn(5, 8, device=other), torch.randn(5, 8))


@pytest.mark.parametrize("tie", [True, False])
def test_module_matches_its_reference_twin(tie):
    fused = KnowledgeAttention(24, 7, d_key=None if tie else 10, tie_key_value=tie).double()
    twin = KnowledgeAttention(24, 7, d_key=None if tie else 10, tie_key_value=tie, reference=True).double()
    twin.load_state_dict(fused.state_dict())
    h = torch.randn(2, 9, 24, dtype=torch.float64)
    out, probs = fused(h, return_probs=True)
    ref, ref_probs = twin(h, return_probs=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(probs, ref_probs)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")
    assert probs.shape == (2, 9, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 9, dtype=torch.float64))


def test_module_with_shared_state_reads_the_given_state():
    shared = KnowledgeAttention(12, 5, shared_state=True).double()
    owner = KnowledgeAttention(12, 5).double()
    owner.w_q.load_state_dict(shared.w_q.state_dict())
    h = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(shared(h, state=owner.Z), owner(h))
    assert "Z" not in dict(shared.named_parameters())
    with pytest.raises(ValueError, match="shared_state=True"):
        shared(h)
    with pytest.raises(ValueError, match="shared_state=False"):
        owner(h, state=owner.Z)


def test_module_rejects_untied_width_mismatch():
    with pytest.raises(ValueError, match="d_key=12"):
        KnowledgeAttention(16, 4, d_key=12, tie_key_value=True)
    with pytest.raises(ValueError, match="num_topics=0"):
        KnowledgeAttention(16, 0)


def test_build_info_reports_the_build():
    info = doe_ext.build_info()
    assert info["torch"] == torch.__version__
    assert info["cuda_kernels"] == bool(info["cuda_archs"])
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if torch.version.cuda is None:
        assert not info["cuda_kernels"]
