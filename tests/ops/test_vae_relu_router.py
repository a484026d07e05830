"""vae_relu_router vs its plain-PyTorch twin: values, gradients (also through regenerated noise),
gradcheck, opcheck, torch.compile, determinism, telemetry, bad input; the module and the adaptive
sparsity controller. One table of cases feeds every test."""
from __future__ import annotations

import pytest
import torch

from doe_ext.nn import SparsityController, VAEReLURouter
from doe_ext.ops import specs, vae_relu_router
from doe_ext.reference import vae_relu_router_ref
from op_testing import DEVICE_DTYPES, DEVICES, HAS_CUDA, assert_close_to_reference, leaves, assert_compile_matches_eager

FWD = torch.ops.doe_ext.vae_relu_router_fwd.default
BWD = torch.ops.doe_ext.vae_relu_router_bwd.default

CASES = specs.CASES["vae_relu_router"]  # the op's cases: doe_ext.ops.specs
NONEMPTY = [c for c in CASES if not c.startswith("empty")]


def make_case(name, device="cpu", dtype=torch.float32):
    """h, the six router parameters (w_mu, b_mu, w_logvar, b_logvar, w_gate, b_gate), noise."""
    a = specs.make_case("vae_relu_router", name, device, dtype)
    return a["h"], [a[k] for k in ("w_mu", "b_mu", "w_logvar", "b_logvar", "w_gate", "b_gate")], a["noise"]


def _close(actual, ref, ref64, name):
    """float32 sums over tokens and weights round differently from eager's: tolerances scaled to the
    tensor's magnitude; other dtypes follow the shared rule."""
    if actual.dtype == torch.float32:
        scale = max(ref64.abs().max().item(), 1.0) if ref64.numel() else 1.0
        torch.testing.assert_close(actual, ref, rtol=1e-5, atol=2e-6 * scale, msg=lambda m: f"{name}: {m}")
    else:
        assert_close_to_reference(actual, ref, ref64, name)


def _forward_backward(fn, h, params, grads, **kw):
    h, *params = leaves([h, *params])
    outs = fn(h, *params, return_z=True, **kw)
    torch.autograd.backward(outs, grads)
    return outs, [t.grad for t in (h, *params)]


def _out_grads(h, params, dtype=None):
    lead, K, dz = h.shape[:-1], params[4].shape[0], params[0].shape[0]
    g = dict(device=h.device, dtype=dtype or h.dtype)
    return [torch.randn(*lead, K, **g), torch.randn(*lead, K, **g), torch.randn(*lead, **g), torch.randn(*lead, dz, **g)]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("activation", ["relu", "softmax"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, training, activation, device, dtype):
    h, params, noise = make_case(case, device, dtype)
    grads = _out_grads(h, params)
    kw = dict(noise=noise, training=training, activation=activation)
    outs, g = _forward_backward(vae_relu_router, h, params, grads, **kw)
    ref, rg = _forward_backward(vae_relu_router_ref, h, params, grads, **kw)
    f64 = lambda ts: [t.double() for t in ts]  # noqa: E731
    ref64, rg64 = _forward_backward(vae_relu_router_ref, h.double(), f64(params), f64(grads),
                                    **{**kw, "noise": noise.double()})
    for name, a, b, c in zip(["gates", "logits", "kl", "z"], outs, ref, ref64):
        assert a.shape == b.shape and a.dtype == dtype
        _close(a, b, c, name)
    for i, (a, b, c) in enumerate(zip(g, rg, rg64)):
        assert a.shape == b.shape
        _close(a, b, c, f"grad {i}")


def test_all_zero_gate_rows_are_valid():
    h, params, noise = make_case("K17-zero-rows", dtype=torch.float64)
    gates, logits, kl, stats = vae_relu_router(h, *params, noise=noise, return_stats=True)
    zero = (gates == 0).all(-1)
    assert 0 < zero.sum() < gates.shape[0], "the case must mix all-zero and active rows"
    assert torch.isfinite(gates).all() and torch.isfinite(kl).all()
    assert stats.zero_rows.item() == zero.sum().item()
    h, *p = leaves([h, *params])
    gates, _, _ = vae_relu_router(h, *p, noise=noise)
    gates.sum().backward()
    assert torch.count_nonzero(h.grad[zero]) == 0  # an all-zero row sends no gradient through the gate
    assert torch.isfinite(h.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_telemetry_counts_match_the_gates(activation, device):
    h, params, noise = make_case("K17-zero-rows", device)
    gates, _, _, stats = vae_relu_router(h, *params, activation=activation, return_stats=True)
    assert stats.block_counts.dtype == torch.int64 and stats.block_counts.device == h.device
    assert torch.equal(stats.block_counts, (gates > 0).sum(0))
    assert stats.zero_rows.item() == (gates == 0).all(-1).sum().item()
    assert stats.tokens == 40
    torch.testing.assert_close(stats.sparsity(), (gates == 0).double().mean())


def _eps(shape_lead, dz, rng, device="cpu", dtype=torch.float32):
    """The op's own eps: with mu = 0 and logvar = 0 its z is eps (the gate is the identity)."""
    g = dict(device=device, dtype=dtype)
    h = torch.zeros(*shape_lead, 1, **g)
    z = FWD(h, torch.zeros(dz, 1, **g), torch.zeros(dz, **g), torch.zeros(dz, 1, **g), torch.zeros(dz, **g),
            torch.eye(dz, **g), torch.zeros(dz, **g), None, rng, True, "relu")[3]
    return z


@pytest.mark.parametrize("activation", ["relu", "softmax"])
@pytest.mark.parametrize("case", ["K17-dz7-batch", "K256-dz5-transposed"])
def test_drawn_noise_gradients_match_reference_with_the_same_eps(case, activation):
    """The backward regenerates eps from (key, stream): its gradients equal the reference's fed the
    very eps the forward drew."""
    h, params, _ = make_case(case, dtype=torch.float64)
    rng = torch.tensor([0x1234_5678_9ABC, 77])
    eps = _eps(h.shape[:-1], params[0].shape[0], rng, dtype=torch.float64)
    grads = _out_grads(h, params)
    hh, *pp = leaves([h, *params])
    outs = FWD(hh, *pp, None, rng, True, activation)
    torch.autograd.backward([outs[0], outs[1], outs[2], outs[3]], grads)
    ref, rg = _forward_backward(vae_relu_router_ref, h, params, grads, noise=eps, activation=activation)
    for a, b in zip(outs[:4], ref):
        torch.testing.assert_close(a, b)
    for a, b in zip([hh.grad] + [p.grad for p in pp], rg):
        torch.testing.assert_close(a, b)


def test_drawn_noise_is_standard_normal_and_decorrelated():
    eps = _eps((20000,), 16, torch.tensor([42, 7])).double()
    x = eps.flatten()
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
    assert abs((x**3).mean()) < 0.03 and abs((x**4).mean() - 3) < 0.06
    assert (x.abs() < 1).double().mean().sub(0.6827).abs() < 0.005  # the bell's shape, not just moments
    corr = torch.corrcoef(eps.T)  # columns (counter j) must be independent streams
    assert (corr - torch.eye(16, dtype=torch.float64)).abs().max() < 0.03
    other = _eps((20000,), 16, torch.tensor([42, 8])).double()  # another stream, same key
    assert torch.corrcoef(torch.stack([x, other.flatten()]))[0, 1].abs() < 0.01


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_draws_the_cpu_eps():
    """One generator for both devices (shared DOE_HD code): the same (key, stream) gives the same eps
    up to FMA contraction."""
    rng = torch.tensor([123456789, 3])
    cpu = _eps((257,), 13, rng)
    cuda = _eps((257,), 13, rng.cuda(), device="cuda")
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-5, atol=1e-5)


def test_same_seed_same_gates_and_gradients():
    h, params, _ = make_case("K128-dz9-rowslice")
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        hh, *pp = leaves([h, *params])
        gates, logits, kl = vae_relu_router(hh, *pp, training=True)
        (gates.square().sum() + logits.sum() + kl.sum()).backward()
        runs.append([gates, hh.grad] + [p.grad for p in pp])
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[2][0]), "another seed must draw other noise"


def test_eval_ignores_noise_and_kl_is_still_computed():
    h, params, noise = make_case("K17-dz7-batch", dtype=torch.float64)
    a = vae_relu_router(h, *params, noise=noise, training=False)
    b = vae_relu_router(h, *params, training=False)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert (a[2] > 0).all()  # KL of a non-standard Gaussian is positive in eval too


@pytest.mark.parametrize("activation", ["relu", "softmax"])
@pytest.mark.parametrize("mode", ["drawn", "given", "eval"])
@pytest.mark.parametrize("case", ["K1-dz1", "K17-dz7-batch", "K17-zero-rows"])
def test_gradcheck_float64(case, mode, activation):
    """Exact Jacobians on the smallest case; a random projection of them (fast mode) on the others."""
    h, params, noise = make_case(case, dtype=torch.float64)
    rng = torch.tensor([5, 6]) if mode == "drawn" else None
    noise = noise if mode == "given" else None

    def fn(*args):
        out = FWD(*args, noise, rng, mode != "eval", activation)
        return out[0], out[1], out[2], out[3]

    assert torch.autograd.gradcheck(fn, tuple(leaves([h, *params])), fast_mode=case != "K1-dz1")


@pytest.mark.parametrize("case", ["K17-dz7-batch", "K128-dz9-rowslice", "K17-zero-rows", "empty"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(case, dtype):
    h, params, noise = make_case(case, dtype=dtype)
    h, *params = leaves([h, *params])
    rng = torch.tensor([9, 1])
    for args in [(noise, None, True, "relu"), (None, rng, True, "softmax"), (None, None, False, "relu")]:
        torch.library.opcheck(FWD, (h, *params, *args))
    out = FWD(h, *params, None, rng, True, "relu")
    grads = _out_grads(h, params)
    saved = [t.detach() for t in (h, params[0], params[2], params[4], out[4], out[0], out[1])]
    torch.library.opcheck(BWD, (*grads, *saved, None, rng, True, "relu"))
    torch.library.opcheck(BWD, (grads[0], None, None, None, *saved, noise, None, True, "relu"))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    h, params, noise = make_case("K17-dz7-batch")

    def step(h, noise, *params):
        gates, logits, kl = vae_relu_router(h, *params, noise=noise)
        return gates.square().sum() + logits.mean() + kl.sum()

    assert_compile_matches_eager(step, [h, noise, *params])


def test_compile_fullgraph_draws_noise_and_stats_without_graph_break():
    torch._dynamo.reset()
    router = VAEReLURouter(12, 7, 17)
    h = torch.randn(2, 3, 12)
    compiled = torch.compile(lambda h: router(h)[0].sum(), fullgraph=True)
    loss = compiled(h)
    loss.backward()
    assert torch.isfinite(loss) and router.mu.weight.grad is not None


def test_empty_input_gives_empty_outputs_and_zero_weight_grads():
    h, params, _ = make_case("empty-batch")
    h, *params = leaves([h, *params])
    gates, logits, kl, stats = vae_relu_router(h, *params, return_stats=True)
    assert gates.shape == (2, 0, 4) and logits.shape == (2, 0, 4) and kl.shape == (2, 0)
    assert stats.zero_rows.item() == 0 and stats.block_counts.tolist() == [0] * 4
    (gates.sum() + kl.sum()).backward()
    assert h.grad.shape == h.shape
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_names_the_argument(device):
    h, params, _ = make_case("K17-dz7-batch", device)
    w_mu, b_mu, w_lv, b_lv, w_g, b_g = params
    with pytest.raises(RuntimeError, match=r"`w_mu`.shape\[1\] == 12"):
        vae_relu_router(h, w_mu[:, :5], b_mu, w_lv, b_lv, w_g, b_g)
    with pytest.raises(RuntimeError, match=r"`w_logvar`.shape\[0\] == 7"):
        vae_relu_router(h, w_mu, b_mu, w_lv[:3], b_lv, w_g, b_g)
    with pytest.raises(RuntimeError, match=r"`b_logvar`.shape\[0\] == 7"):
        vae_relu_router(h, w_mu, b_mu, w_lv, b_lv[:2], w_g, b_g)
    with pytest.raises(RuntimeError, match=r"`w_gate`.shape\[1\] == 7"):
        vae_relu_router(h, w_mu, b_mu, w_lv, b_lv, w_g[:, :2], b_g)
    with pytest.raises(RuntimeError, match=r"`b_gate`.shape\[0\] == 17"):
        vae_relu_router(h, w_mu, b_mu, w_lv, b_lv, w_g, b_g[:3])
    with pytest.raises(RuntimeError, match=r"`w_gate` to be 2-D"):
        vae_relu_router(h, w_mu, b_mu, w_lv, b_lv, w_g[None], b_g)
    with pytest.raises(RuntimeError, match=r"`b_mu` of dtype float32"):
        vae_relu_router(h, w_mu, b_mu.double(), w_lv, b_lv, w_g, b_g)
    with pytest.raises(RuntimeError, match=r"`noise` of shape \[2, 3, 7\]"):
        vae_relu_router(h, *params, noise=torch.randn(2, 3, 6, device=device))
    with pytest.raises(RuntimeError, match=r'`activation` to be "relu" or "softmax", got "gelu"'):
        vae_relu_router(h, *params, activation="gelu")
    with pytest.raises(RuntimeError, match=r"`h` of dtype float32, float64, float16 or bfloat16 on cpu"):
        vae_relu_router(h.cpu().long(), *[p.cpu() for p in params])
    with pytest.raises(RuntimeError, match=r"at least one knowledge block"):
        vae_relu_router(h, w_mu, b_mu, w_lv, b_lv, w_g[:0], b_g[:0])
    with pytest.raises(RuntimeError, match=r"`rng` of shape \[2\]"):
        FWD(h, *params, None, torch.zeros(3, dtype=torch.int64, device=device), True, "relu")
    with pytest.raises(RuntimeError, match=r"training without `noise` needs `rng`"):
        FWD(h, *params, None, None, True, "relu")


_BWD_CASES = {  # name -> (argument changes, the message); each once segfaulted or read out of bounds
    "rng of zero elements, eval": (dict(rng=lambda a: a["rng"][:0], training=False), r"`rng` of shape \[2\]"),
    "rng of one element": (dict(rng=lambda a: a["rng"][:1]), r"`rng` of shape \[2\]"),
    "w_gate for another dz": (dict(w_gate=lambda a: torch.randn(4, 9)), r"`w_gate`.shape\[1\] == 3"),
    "w_logvar for another dz": (dict(w_logvar=lambda a: torch.randn(5, 6)), r"`w_logvar`.shape\[0\] == 3"),
    "mu_logvar too narrow": (dict(mu_logvar=lambda a: a["mu_logvar"][..., :4]), r"`mu_logvar` of shape \[2, 5, 6\]"),
    "logits of another K": (dict(logits=lambda a: a["logits"][..., :2]), r"`logits` of shape \[2, 5, 4\]"),
    "gates of another dtype": (dict(gates=lambda a: a["gates"].double()), r"`gates` of dtype float32"),
    "grad_kl broadcast": (dict(grad_kl=lambda a: torch.ones(1)), r"`grad_kl` of shape \[2, 5\]"),
    "grad_z of another dz": (dict(grad_z=lambda a: torch.ones(2, 5, 2)), r"`grad_z` of shape \[2, 5, 3\]"),
    "noise of another dz": (dict(noise=lambda a: torch.randn(2, 5, 2)), r"`noise` of shape \[2, 5, 3\]"),
}


def test_backward_op_checks_what_it_reads():
    """The raw backward op, called as torch.compile or a user might: every tensor it reads is checked
    first. The cases run in one child process that reports each as it goes, so a crash fails this test
    naming its case instead of ending the run."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    here = Path(__file__).resolve().parent
    code = textwrap.dedent(f"""
        import re, sys, torch, doe_ext
        sys.path[:0] = {[str(here), str(here.parent)]!r}
        from test_vae_relu_router import _BWD_CASES, backward_args
        for case, (changes, message) in sorted(_BWD_CASES.items()):
            print("start\t" + case, flush=True)
            args = backward_args()
            for k, f in changes.items():
                args[k] = f(args) if callable(f) else f
            try:
                torch.ops.doe_ext.vae_relu_router_bwd(**args)
                print(case + "\tno error", flush=True)
            except RuntimeError as e:
                print(case + "\t" + ("ok" if re.search(message, str(e)) else "wrong message: " + str(e)), flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, f"child died (code {done.returncode}) after: {lines[-1:]}; {done.stderr[-2000:]}"
    results = dict(line.split("\t", 1) for line in lines if not line.startswith("start\t"))
    bad = {case: r for case, r in results.items() if r != "ok"}
    assert sorted(results) == sorted(_BWD_CASES) and not bad, bad


def backward_args() -> dict:
    """Valid arguments of the raw backward op: h [2, 5, 6], dz = 3, K = 4, training with drawn noise."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 6, generator=g)
    w_mu, w_logvar, w_gate = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g), torch.randn(4, 3, generator=g)
    b_mu, b_logvar, b_gate = torch.zeros(3), torch.zeros(3), torch.zeros(4)
    rng = torch.tensor([7, 1], dtype=torch.int64)
    gates, logits, kl, z, mulv, _, _ = FWD(h, w_mu, b_mu, w_logvar, b_logvar, w_gate, b_gate, None, rng, True, "relu")
    return dict(grad_gates=torch.ones_like(gates), grad_logits=None, grad_kl=torch.ones_like(kl), grad_z=None, h=h,
                w_mu=w_mu, w_logvar=w_logvar, w_gate=w_gate, mu_logvar=mulv, gates=gates, logits=logits, noise=None,
                rng=rng, training=True, activation="relu")


def test_backward_args_are_valid():
    out = torch.ops.doe_ext.vae_relu_router_bwd(**backward_args())
    assert out[0].shape == (2, 5, 6) and out[5].shape == (4, 3)


def test_weight_on_another_device_names_the_argument():
    other = "cuda" if HAS_CUDA else "meta"
    h, params, _ = make_case("K1-dz1")
    params[4] = params[4].to(other)
    with pytest.raises(RuntimeError, match=r"`w_gate` on cpu"):
        vae_relu_router(h, *params)


@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_module_matches_its_reference_twin(activation):
    fused = VAEReLURouter(24, 5, 17, activation=activation, decoder=True).double().eval()
    twin = VAEReLURouter(24, 5, 17, activation=activation, decoder=True, reference=True).double().eval()
    twin.load_state_dict(fused.state_dict())
    h = torch.randn(2, 9, 24, dtype=torch.float64)
    target = torch.randn(2, 9, 24, dtype=torch.float64)
    out, ref = fused(h, recon_target=target), twin(h, recon_target=target)
    assert len(out) == 4 and out[3].shape == (2, 9)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    sum(o.sum() for o in out).backward()
    sum(o.sum() for o in ref).backward()
    for (name, p), q in zip(fused.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")
    for a, b in zip(fused.last_stats[:2], twin.last_stats[:2]):
        assert torch.equal(a, b)


def test_module_training_draws_noise_and_rejects_bad_config():
    router = VAEReLURouter(8, 3, 4)
    h = torch.randn(6, 8)
    assert not torch.equal(router(h)[1], router(h)[1])  # training: fresh eps per call
    router.eval()
    assert torch.equal(router(h)[1], router(h)[1])
    with pytest.raises(ValueError, match="no decoder"):
        router(h, recon_target=h)
    with pytest.raises(ValueError, match='activation must be "relu" or "softmax", got "tanh"'):
        VAEReLURouter(8, 3, 4, activation="tanh")
    with pytest.raises(ValueError, match="latent_dim=0"):
        VAEReLURouter(8, 0, 4)


@pytest.mark.parametrize("target", [0.7, 0.95])
def test_sparsity_controller_moves_sparsity_to_the_target(target):
    """A toy regression whose best fit is ~50% sparse: the adaptive L1 drives the gates to the target
    sparsity and holds them there (the multiplicative update backs off once it is reached)."""
    torch.manual_seed(0)
    router = VAEReLURouter(16, 8, 32)
    ctrl = SparsityController(target_sparsity=target, init_coef=1e-2, factor=1.02, enabled=True)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    h = torch.randn(256, 16)
    want = torch.relu(torch.randn(256, 32))
    trace = []
    for _ in range(400):
        gates, _, _ = router(h)
        loss = (gates - want).square().mean() + ctrl.penalty(gates)
        opt.zero_grad()
        loss.backward()
        opt.step()
        trace.append(ctrl.update(gates).item())
    settled = sum(trace[-50:]) / 50
    assert trace[0] < 0.62
    assert abs(settled - target) < 0.03, f"sparsity settled at {settled:.3f}, target {target} (start {trace[0]:.3f})"


def test_sparsity_controller_is_off_by_default():
    ctrl = SparsityController()
    gates = torch.relu(torch.randn(10, 4))
    assert ctrl.penalty(gates).item() == 0
    before = ctrl.coef.clone()
    ctrl.update(gates)
    assert torch.equal(ctrl.coef, before)
    on = SparsityController(target_sparsity=0.99, init_coef=1.0, factor=2.0, enabled=True)
    on.update(gates)  # gates are ~50% sparse, below the target: the coefficient goes up
    assert on.coef.item() == 2.0
    torch.testing.assert_close(on.penalty(gates), 2.0 * gates.sum(-1).mean())
