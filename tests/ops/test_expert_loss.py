"""expert_loss vs F.cross_entropy and its plain-PyTorch twin: hard and soft targets, ignore_index,
label smoothing, reductions, all-ignored batches, gradcheck, opcheck, torch.compile, bad input; the
module and composite_loss. One table of cases feeds every test."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from doe_ext.losses import composite_loss
from doe_ext.nn import ExpertLoss
from doe_ext.ops import expert_loss, specs
from doe_ext.reference import expert_loss_ref
from op_testing import DEVICE_DTYPES, DEVICES, HAS_CUDA, assert_close_to_reference, leaves

FWD = torch.ops.doe_ext.expert_loss_fwd.default
BWD = torch.ops.doe_ext.expert_loss_bwd.default

CASES = specs.CASES["expert_loss"]  # the op's cases: doe_ext.ops.specs
NONEMPTY = [c for c in CASES if not c.startswith("empty")]


def make_case(name, device="cpu", dtype=torch.float32):
    return tuple(specs.make_case("expert_loss", name, device, dtype).values())


def _loss_and_grad(fn, logits, target, grad_out, **kw):
    (x,) = leaves([logits])
    loss = fn(x, target, **kw)
    loss.backward(grad_out)
    return loss, x.grad


KW = [dict(reduction=r, label_smoothing=s) for r in ("mean", "sum", "none") for s in (0.0, 0.1)]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("kw", KW, ids=lambda kw: f"{kw['reduction']}-ls{kw['label_smoothing']}")
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, kw, device, dtype):
    logits, target = make_case(case, device, dtype)
    shape = logits.shape[:-1] if kw["reduction"] == "none" else ()
    grad_out = torch.randn(shape, device=device, dtype=dtype)
    loss, grad = _loss_and_grad(expert_loss, logits, target, grad_out, **kw)
    ref, ref_grad = _loss_and_grad(expert_loss_ref, logits, target, grad_out, **kw)
    t64 = target if not target.is_floating_point() else target.double()
    ref64, ref64_grad = _loss_and_grad(expert_loss_ref, logits.double(), t64, grad_out.double(), **kw)
    assert loss.shape == ref.shape and loss.dtype == dtype and grad.shape == logits.shape
    assert_close_to_reference(loss, ref, ref64, "loss")
    assert_close_to_reference(grad, ref_grad, ref64_grad, "grad")


@pytest.mark.parametrize("kw", KW, ids=lambda kw: f"{kw['reduction']}-ls{kw['label_smoothing']}")
@pytest.mark.parametrize("case", ["K1-hard", "K17-hard-ignored", "K128-hard-transposed", "K256-hard"])
def test_hard_labels_equal_cross_entropy(case, kw):
    logits, target = make_case(case, dtype=torch.float64)
    K = logits.shape[-1]
    loss = expert_loss(logits, target, **kw)
    ce = F.cross_entropy(logits.reshape(-1, K), target.reshape(-1), **kw)
    torch.testing.assert_close(loss, ce.reshape(loss.shape))
    x = logits.detach().requires_grad_()
    expert_loss(x, target, **kw).sum().backward()
    y = logits.detach().requires_grad_()
    F.cross_entropy(y.reshape(-1, K), target.reshape(-1), **kw).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("case", ["K17-soft", "K128-soft-zeros", "K256-soft"])
def test_soft_targets_equal_kl_divergence(case):
    logits, target = make_case(case, dtype=torch.float64)
    K = logits.shape[-1]
    logp = torch.log_softmax(logits.reshape(-1, K), -1)
    t = target.reshape(-1, K)
    torch.testing.assert_close(expert_loss(logits, target), F.kl_div(logp, t, reduction="batchmean"))
    torch.testing.assert_close(expert_loss(logits, target, reduction="none").reshape(-1),
                               F.kl_div(logp, t, reduction="none").sum(-1))
    # a one-hot target gives the cross-entropy to that label (KL = CE when the target's entropy is 0)
    y = logits.argmin(-1)
    torch.testing.assert_close(expert_loss(logits, F.one_hot(y, K).double()), expert_loss(logits, y))


def test_soft_target_zero_mass_contributes_nothing():
    logits = torch.randn(4, 6, dtype=torch.float64)
    target = torch.zeros(4, 6, dtype=torch.float64)
    target[:, 2] = 1
    loss = expert_loss(logits, target, reduction="none")
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, -torch.log_softmax(logits, -1)[:, 2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_grad(reduction, device):
    logits, target = make_case("all-ignored", device)
    assert (target == -100).all()
    x = logits.requires_grad_()
    loss = expert_loss(x, target, reduction=reduction)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    loss.sum().backward()
    assert torch.count_nonzero(x.grad) == 0
    if reduction == "mean":
        assert F.cross_entropy(logits.detach(), target).isnan()  # what the op improves on


@pytest.mark.parametrize("case", ["empty", "empty-soft"])
def test_empty_input(case):
    logits, target = make_case(case)
    x = logits.requires_grad_()
    assert expert_loss(x, target, reduction="none").shape == logits.shape[:-1]
    loss = expert_loss(x, target)
    assert loss.shape == () and loss.item() == 0
    loss.backward()
    assert x.grad.shape == logits.shape


@pytest.mark.parametrize("kw", [dict(reduction="mean"), dict(reduction="none", label_smoothing=0.2)],
                         ids=["mean", "none-ls"])
@pytest.mark.parametrize("case", ["K1-hard", "K17-hard-ignored", "K17-soft", "K128-soft-zeros"])
def test_gradcheck_float64(case, kw):
    logits, target = make_case(case, dtype=torch.float64)
    (x,) = leaves([logits])
    assert torch.autograd.gradcheck(lambda x: expert_loss(x, target, **kw), (x,), fast_mode=x.numel() > 500)


@pytest.mark.parametrize("case", ["K17-hard-ignored", "K128-soft-zeros", "all-ignored", "empty"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(case, dtype):
    logits, target = make_case(case, dtype=dtype)
    (x,) = leaves([logits])
    for red in ("mean", "sum", "none"):
        torch.library.opcheck(FWD, (x, target, -100, red, 0.1, True))
    torch.library.opcheck(FWD, (x.detach(), target, -100, "mean", 0.0, False))
    _, rows, weight = FWD(x.detach(), target, -100, "mean", 0.1, True)
    torch.library.opcheck(BWD, (torch.tensor(1.5, dtype=dtype), rows, weight))
    torch.library.opcheck(BWD, (torch.randn(logits.shape[:-1], dtype=dtype), rows, torch.tensor(1.0, dtype=dtype)))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    logits, target = make_case("K17-hard-ignored")
    soft = torch.softmax(torch.randn(2, 9, 17), -1)

    def step(x, target, soft):
        return expert_loss(x, target, label_smoothing=0.1) + 0.5 * expert_loss(x, soft, reduction="sum")

    compiled = torch.compile(step, fullgraph=True)
    (a,), (b,) = leaves([logits]), leaves([logits])
    eager_loss, comp_loss = step(a, target, soft), compiled(b, target, soft)
    eager_loss.backward()
    comp_loss.backward()
    torch.testing.assert_close(comp_loss, eager_loss)
    torch.testing.assert_close(b.grad, a.grad)


def test_no_grad_forward_skips_the_gradient_buffer():
    logits, target = make_case("K128-hard-transposed")
    loss, rows, _ = FWD(logits, target, -100, "mean", 0.0, False)
    assert rows.numel() == 0
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 128), target.reshape(-1)))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_names_the_argument(device):
    logits = torch.randn(4, 5, device=device)
    labels = torch.tensor([0, 1, 4, -100], device=device)
    with pytest.raises(RuntimeError, match=r"`target` values in \[0, 5\) .* got 7 at flat row 2"):
        expert_loss(logits, torch.tensor([0, 1, 7, -100], device=device))
    with pytest.raises(RuntimeError, match=r"got 9 at flat row 1"):  # the first of several bad rows
        expert_loss(torch.randn(300, 5, device=device), torch.tensor([0, 9] + [7] * 298, device=device))
    with pytest.raises(RuntimeError, match=r"`target` values in \[0, 5\) .* got -1 at flat row 0"):
        expert_loss(logits, torch.tensor([-1, 1, 2, 3], device=device))
    with pytest.raises(RuntimeError, match=r"int64 `target` of shape \[4\]"):
        expert_loss(logits, labels[:3])
    with pytest.raises(RuntimeError, match=r"`target` of dtype int64, got int32"):
        expert_loss(logits, labels.int())
    with pytest.raises(RuntimeError, match=r"float `target` of shape \[4, 5\]"):
        expert_loss(logits, torch.rand(4, 6, device=device))
    with pytest.raises(RuntimeError, match=r"`target` of dtype float32 \(the dtype of `logits`\), got float64"):
        expert_loss(logits, torch.rand(4, 5, device=device, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"probabilities >= 0"):
        expert_loss(logits, torch.full((4, 5), -0.2, device=device))
    with pytest.raises(RuntimeError, match=r'`reduction` to be "mean", "sum" or "none", got "max"'):
        expert_loss(logits, labels, reduction="max")
    with pytest.raises(RuntimeError, match=r"`label_smoothing` in \[0, 1\], got 1.5"):
        expert_loss(logits, labels, label_smoothing=1.5)
    with pytest.raises(RuntimeError, match=r"`logits` of dtype float32, float64, float16 or bfloat16 on cpu"):
        expert_loss(logits.cpu().long(), labels.cpu())


def test_target_on_another_device_names_the_argument():
    other = "cuda" if HAS_CUDA else "meta"
    with pytest.raises(RuntimeError, match=r"`target` on cpu"):
        expert_loss(torch.randn(4, 5), torch.zeros(4, dtype=torch.int64, device=other))


@pytest.mark.parametrize("case", ["K17-hard-ignored", "K17-soft"])
def test_module_matches_its_reference_twin(case):
    logits, target = make_case(case, dtype=torch.float64)
    fused, twin = ExpertLoss(label_smoothing=0.05), ExpertLoss(label_smoothing=0.05, reference=True)
    (a,), (b,) = leaves([logits]), leaves([logits])
    la, lb = fused(a, target), twin(b, target)
    torch.testing.assert_close(la, lb)
    la.backward()
    lb.backward()
    torch.testing.assert_close(a.grad, b.grad)
    with pytest.raises(ValueError, match='reduction must be "mean", "sum" or "none"'):
        ExpertLoss(reduction="avg")


def test_composite_loss_is_eq_4():
    ntp, expert = torch.tensor(2.0, requires_grad=True), torch.tensor(5.0, requires_grad=True)
    total = composite_loss(ntp, expert, alpha=0.001)
    torch.testing.assert_close(total, torch.tensor(0.999 * 2.0 + 0.001 * 5.0))
    total.backward()
    assert ntp.grad.item() == pytest.approx(0.999) and expert.grad.item() == pytest.approx(0.001)
    with pytest.raises(ValueError, match=r"`alpha` in \[0, 1\], got 1.5"):
        composite_loss(ntp, expert, alpha=1.5)
    vae = torch.tensor(3.0)  # App. H.3's third component: the router's KL + reconstruction
    torch.testing.assert_close(composite_loss(ntp, expert, 0.5, vae=vae, beta=0.1), torch.tensor(3.5 + 0.3))
    with pytest.raises(ValueError, match=r"needs `vae`"):
        composite_loss(ntp, expert, beta=0.1)
