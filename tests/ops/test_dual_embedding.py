"""dual_embedding vs its plain-PyTorch twin: values, gradients (bitwise deterministic), gradcheck,
opcheck, torch.compile, bad ids and arguments, the DualInputEmbedding module."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from doe_ext.nn import DualInputEmbedding
from doe_ext.ops import dual_embedding, specs
from doe_ext.reference import dual_embedding_ref
from op_testing import DEVICE_DTYPES, DEVICES, assert_close_to_reference, leaves, assert_compile_matches_eager

FWD = torch.ops.doe_ext.dual_embedding_fwd.default
BWD = torch.ops.doe_ext.dual_embedding_bwd.default

CASES = specs.CASES["dual_embedding"]  # the op's cases: doe_ext.ops.specs


def make_case(name, device="cpu", dtype=torch.float32):
    return tuple(specs.make_case("dual_embedding", name, device, dtype).values())


def _forward_backward(fn, token_ids, topic_ids, token_weight, topic_weight, padding_idx, grad_out):
    token_weight, topic_weight = leaves([token_weight, topic_weight])
    out = fn(token_ids, topic_ids, token_weight, topic_weight, padding_idx=padding_idx)
    out.backward(grad_out)
    return out, [token_weight.grad, topic_weight.grad]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, device, dtype):
    token_ids, topic_ids, tw, kw, padding_idx = make_case(case, device, dtype)
    grad_out = torch.randn(*token_ids.shape, tw.shape[1] + kw.shape[1], device=device, dtype=dtype)
    out, grads = _forward_backward(dual_embedding, token_ids, topic_ids, tw, kw, padding_idx, grad_out)
    ref, ref_grads = _forward_backward(dual_embedding_ref, token_ids, topic_ids, tw, kw, padding_idx, grad_out)
    ref64, ref64_grads = _forward_backward(dual_embedding_ref, token_ids, topic_ids, tw.double(), kw.double(),
                                           padding_idx, grad_out.double())
    assert out.shape == (*token_ids.shape, tw.shape[1] + kw.shape[1]) and out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # a gather: exact
    for name, g, rg, rg64 in zip(("grad_token_weight", "grad_topic_weight"), grads, ref_grads, ref64_grads):
        assert g.shape == rg.shape
        assert_close_to_reference(g, rg, rg64, name)
    unlabeled = topic_ids == -1
    assert torch.count_nonzero(out[..., tw.shape[1]:][unlabeled]) == 0
    if padding_idx is not None:
        assert torch.count_nonzero(grads[0][padding_idx]) == 0


def test_large_table_gradient_matches_reference():
    # >= 8 MiB: the CPU backs the gradient with huge-page-advised memory; it must behave as any tensor
    V, d, K, dk = 4096, 512, 8, 16
    token_ids, topic_ids = torch.randint(0, V, (3, 700)), torch.randint(-1, K, (3, 700))
    tw, kw = torch.randn(V, d), torch.randn(K, dk)
    grad_out = torch.randn(3, 700, d + dk)
    _, grads = _forward_backward(dual_embedding, token_ids, topic_ids, tw, kw, None, grad_out)
    _, ref_grads = _forward_backward(dual_embedding_ref, token_ids, topic_ids, tw, kw, None, grad_out)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)
    grads[0].add_(1.0).mul_(0.5)  # an ordinary writable tensor
    assert grads[0].is_contiguous() and grads[0].shape == (V, d)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_bitwise_deterministic(device):
    # Many tokens on few rows: a race or an order that depends on scheduling would show.
    V, K, d, dk, N = 11, 3, 64, 32, 20000
    token_ids = torch.randint(0, V, (N,), device=device)
    topic_ids = torch.randint(-1, K, (N,), device=device)
    tw = torch.randn(V, d, device=device, requires_grad=True)
    kw = torch.randn(K, dk, device=device, requires_grad=True)
    grad_out = torch.randn(N, d + dk, device=device)
    runs = [torch.autograd.grad(dual_embedding(token_ids, topic_ids, tw, kw), (tw, kw), grad_out) for _ in range(3)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the order of the additions must not depend on the thread count
        runs.append(torch.autograd.grad(dual_embedding(token_ids, topic_ids, tw, kw), (tw, kw), grad_out))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    # and it is the right sum: each row's tokens added in token order, checked in float64
    ref = torch.zeros(V, d, dtype=torch.float64, device=device).index_add_(0, token_ids, grad_out[:, :d].double())
    torch.testing.assert_close(runs[0][0].double(), ref, rtol=1e-5, atol=1e-4)


# padding_idx deliberately withholds a true gradient (as nn.Embedding): gradcheck runs without it.
@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("empty") and CASES[c][6] is None])
def test_gradcheck_float64(case):
    token_ids, topic_ids, tw, kw, padding_idx = make_case(case, dtype=torch.float64)
    tw, kw = leaves([tw, kw])
    fn = lambda tw, kw: dual_embedding(token_ids, topic_ids, tw, kw, padding_idx=padding_idx)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (tw, kw), fast_mode=tw.numel() + kw.numel() > 300)


@pytest.mark.parametrize("case", ["batch-odd-unlabeled", "padding", "all-unlabeled", "empty"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(case, dtype):
    token_ids, topic_ids, tw, kw, padding_idx = make_case(case, dtype=dtype)
    tw, kw = leaves([tw, kw])
    p = -1 if padding_idx is None else padding_idx % tw.shape[0]
    torch.library.opcheck(FWD, (token_ids, topic_ids, tw, kw, p))
    grad_out = torch.randn(*token_ids.shape, tw.shape[1] + kw.shape[1], dtype=dtype)
    torch.library.opcheck(BWD, (grad_out, token_ids, topic_ids, tw.detach(), kw.detach(), p))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    token_ids, topic_ids, tw, kw, _ = make_case("batch-odd-unlabeled")

    def step(token_ids, topic_ids, tw, kw):
        out = dual_embedding(token_ids, topic_ids, tw, kw, padding_idx=4)
        return (out * out).sum()

    assert_compile_matches_eager(step, [token_ids, topic_ids, tw, kw])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_ids_name_the_argument_and_value(device):
    tw, kw = torch.randn(10, 4, device=device), torch.randn(3, 2, device=device)
    ids = torch.tensor([[1, 2], [3, 4]], device=device)
    topics = torch.tensor([[0, -1], [2, 1]], device=device)
    with pytest.raises(RuntimeError, match=r"`token_ids` out of range: got 10 at flat position 3, expected 0 <= id < 10"):
        dual_embedding(torch.tensor([[1, 2], [3, 10]], device=device), topics, tw, kw)
    with pytest.raises(RuntimeError, match=r"`token_ids` out of range: got -2"):
        dual_embedding(torch.tensor([[1, -2], [3, 4]], device=device), topics, tw, kw)
    with pytest.raises(RuntimeError, match=r"`topic_ids` out of range: got 3 at flat position 2, expected -1 \(no label\) or 0 <= id < 3"):
        dual_embedding(ids, torch.tensor([[0, -1], [3, 1]], device=device), tw, kw)
    with pytest.raises(RuntimeError, match=r"`topic_ids` out of range: got -2"):
        dual_embedding(ids, torch.tensor([[0, -2], [1, 1]], device=device), tw, kw)
    # the tensors stay usable after the error (no device-side assert)
    assert dual_embedding(ids, topics, tw, kw).shape == (2, 2, 6)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_name_the_argument(device):
    tw, kw = torch.randn(10, 4, device=device), torch.randn(3, 2, device=device)
    ids = torch.tensor([1, 2], device=device)
    with pytest.raises(RuntimeError, match=r"`topic_ids` of shape \[2\]"):
        dual_embedding(ids, torch.tensor([0, 1, 2], device=device), tw, kw)
    with pytest.raises(RuntimeError, match=r"`token_ids` of dtype int64, got int32"):
        dual_embedding(ids.int(), ids, tw, kw)
    with pytest.raises(RuntimeError, match=r"`topic_weight` of dtype float32"):
        dual_embedding(ids, ids, tw, kw.double())
    with pytest.raises(RuntimeError, match=r"`token_weight` to be 2-D"):
        dual_embedding(ids, ids, tw[None], kw)
    with pytest.raises(ValueError, match=r"`padding_idx` in \[-10, 10\)"):
        dual_embedding(ids, ids, tw, kw, padding_idx=10)


def test_tables_on_another_device_name_the_argument():
    other = "cuda" if torch.cuda.is_available() else "meta"
    ids = torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match=r"`topic_weight` on cpu"):
        dual_embedding(ids, ids, torch.randn(10, 4), torch.randn(3, 2, device=other))


def test_empty_input_gives_empty_output_and_zero_grads():
    token_ids, topic_ids, tw, kw, _ = make_case("empty-batch")
    tw, kw = leaves([tw, kw])
    out = dual_embedding(token_ids, topic_ids, tw, kw)
    assert out.shape == (3, 0, 6)
    out.sum().backward()
    assert torch.count_nonzero(tw.grad) == 0 and torch.count_nonzero(kw.grad) == 0


@pytest.mark.parametrize("project", [True, False])
def test_module_matches_its_reference_twin(project):
    fused = DualInputEmbedding(40, 12, 6, 5, project=project, padding_idx=0).double()
    twin = DualInputEmbedding(40, 12, 6, 5, project=project, padding_idx=0, reference=True).double()
    with torch.no_grad():  # move the projection off its [I | 0] start so the topic part matters
        for p in fused.parameters():
            p.add_(0.1 * torch.randn_like(p))
    twin.load_state_dict(fused.state_dict())
    token_ids = torch.randint(0, 40, (3, 7))
    topic_ids = torch.randint(-1, 6, (3, 7))
    out, ref = fused(token_ids, topic_ids), twin(token_ids, topic_ids)
    assert out.shape == (3, 7, 12 if project else 17)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")


def test_projection_starts_as_the_token_embedding():
    emb = nn.Embedding(30, 16, padding_idx=1)
    dual = DualInputEmbedding.from_pretrained(emb, num_topics=4, topic_dim=8)
    token_ids = torch.randint(0, 30, (2, 9))
    topic_ids = torch.randint(-1, 4, (2, 9))
    torch.testing.assert_close(dual(token_ids, topic_ids), emb(token_ids), rtol=0, atol=0)
    torch.testing.assert_close(dual(token_ids), emb(token_ids), rtol=0, atol=0)
    assert dual.padding_idx == 1
    # the projection's topic columns start at zero but learn: they get a gradient
    dual(token_ids, topic_ids).square().sum().backward()
    assert torch.count_nonzero(dual.proj.weight.grad[:, 16:]) > 0


def test_module_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_topics=0"):
        DualInputEmbedding(10, 4, 0, 2)
    with pytest.raises(ValueError, match="padding_idx=12"):
        DualInputEmbedding(10, 4, 3, 2, padding_idx=12)
