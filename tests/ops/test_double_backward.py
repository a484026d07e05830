"""Double backward of every differentiable op (issue 14, part 4): ``gradgradcheck`` in float64, and
a ``create_graph=True`` gradient equals the fused one (the twin path of doe_ext.ops._double is the
same function). What users do with it: gradient penalties, MAML, Hessian-vector products."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from doe_ext.ops import dual_embedding, expert_loss, knowledge_attention, lora_merge, multi_lora_linear, vae_relu_router

D = dict(dtype=torch.float64)


def rand(*shape):
    return torch.randn(*shape, **D, requires_grad=True)


def router_seeded(*args, **kw):
    torch.manual_seed(7)  # the op draws its Philox pair from torch's generator: reseed for a pure function
    return vae_relu_router(*args, **kw)


CASES = {
    "knowledge_attention": (lambda q, zk, zv, r: knowledge_attention(q, zk, zv, r), lambda: (
        rand(2, 3, 5), rand(4, 5), rand(4, 3), rand(2, 3, 3))),
    "dual_embedding": (lambda tw, kw: dual_embedding(torch.tensor([[1, 0, 3]]), torch.tensor([[2, -1, 0]]), tw, kw,
                                                     padding_idx=4), lambda: (rand(5, 3), rand(3, 2))),  # id 4 unused
    "expert_loss_hard": (lambda x: expert_loss(x, torch.tensor([0, 2, -100, 1]), label_smoothing=0.1),
                         lambda: (rand(4, 3),)),
    "expert_loss_soft": (lambda x: expert_loss(x, torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(0),
                                                                            **D), -1), reduction="sum"),
                         lambda: (rand(4, 3),)),
    "vae_relu_router_noise": (lambda h, wm, bm, wl, bl, wg, bg: vae_relu_router(
        h, wm, bm, wl, bl, wg, bg, noise=torch.linspace(-1, 1, 3 * 4, **D).view(3, 4), activation="softmax"),
        lambda: (rand(3, 5), rand(4, 5), rand(4), rand(4, 5), rand(4), rand(6, 4), rand(6))),
    "vae_relu_router_rng": (lambda h, wm, bm, wl, bl, wg, bg: router_seeded(h, wm, bm, wl, bl, wg, bg, return_z=True),
                            lambda: (rand(3, 5), rand(4, 5), rand(4), rand(4, 5), rand(4), rand(6, 4), rand(6) + 3)),
    "lora_merge": (lambda w, a, b, s: lora_merge(w, a, b, s), lambda: (rand(4, 5), rand(2, 3, 5), rand(2, 4, 3), rand(2))),
    "multi_lora_linear": (lambda x, w, b, a, bb, s: multi_lora_linear(x, w, b, a, bb, torch.tensor([[0, -1], [1, 1], [2, 0]]), s),
                          lambda: (rand(3, 5), rand(4, 5), rand(4), rand(3, 2, 5), rand(3, 4, 2), rand(3, 2))),
}


@pytest.mark.parametrize("case", CASES)
def test_gradgradcheck_float64(case):
    fn, make = CASES[case]
    torch.manual_seed(0)
    inputs = make()
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("case", CASES)
def test_create_graph_gradient_equals_the_fused_one(case):
    fn, make = CASES[case]
    torch.manual_seed(0)
    inputs = make()

    def loss():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        return sum((o * torch.arange(o.numel(), **D).view_as(o).sin()).sum() for o in outs if o.is_floating_point())

    fused = torch.autograd.grad(loss(), inputs, allow_unused=True)
    twin = torch.autograd.grad(loss(), inputs, create_graph=True, allow_unused=True)
    for i, (a, b) in enumerate(zip(fused, twin)):
        assert (a is None) == (b is None), i
        if a is not None:
            torch.testing.assert_close(b, a, msg=lambda m, i=i: f"input {i}: {m}")


def test_a_gradient_penalty_trains_through_knowledge_attention():
    """The issue's failing call: ``autograd.grad(..., create_graph=True)`` then a backward of the
    gradient's norm (a WGAN-GP-style penalty) reaches the knowledge state."""
    torch.manual_seed(0)
    q, z = rand(6, 8), rand(5, 8)
    (g,) = torch.autograd.grad(knowledge_attention(q, z, z).square().sum(), q, create_graph=True)
    g.norm().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
