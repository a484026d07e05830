"""Helpers every op test shares: devices and dtypes of the contract, low-precision error bounds,
and leaf copies of sample inputs."""
from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))]
CPU_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (device, dtype) pairs of the contract: CPU float32/float64/float16/bfloat16, CUDA float32/float16/bfloat16.
DEVICE_DTYPES = [pytest.param("cpu", dt, id=f"cpu-{str(dt)[6:]}") for dt in CPU_DTYPES] + [
    pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))
    for dt in CUDA_DTYPES
]
LOW_PRECISION = (torch.float16, torch.bfloat16)


def leaves(tensors, dtype=None):
    """Detached copies that require grad (None and integer tensors pass through unchanged)."""
    out = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            c = t.detach().to(dtype or t.dtype, copy=True)
            out.append(c.requires_grad_(True))
        else:
            out.append(t)
    return out


def assert_close_to_reference(actual, ref_same_dtype, ref_f64, name=""):
    """float32/float64: tight tolerances against the reference. float16/bfloat16 (flash-attention's
    rule): the op's error against a float64 reference is at most 2x the reference's own error in
    that dtype, plus a small floor for outputs the reference happens to get exactly."""
    if actual.dtype in LOW_PRECISION:
        assert actual.shape == ref_f64.shape, f"{name}: shape {tuple(actual.shape)}, expected {tuple(ref_f64.shape)}"
        if actual.numel() == 0:
            return
        err = (actual.double() - ref_f64.double()).abs().max().item()
        ref_err = (ref_same_dtype.double() - ref_f64.double()).abs().max().item()
        floor = 1e-3 * max(ref_f64.abs().max().item(), 1.0)
        assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} > 2 x reference's {ref_err:.3g} (+{floor:.1g})"
    else:
        torch.testing.assert_close(actual, ref_same_dtype, msg=lambda m: f"{name}: {m}")


def assert_compile_matches_eager(loss_fn, inputs):
    """``torch.compile(loss_fn, fullgraph=True)`` gives eager's loss and gradients. ``inputs``: floating
    tensors become fresh leaves for each run; everything else (ids, None) is passed as it is."""
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    eager_in, comp_in = leaves(inputs), leaves(inputs)
    eager_loss, comp_loss = loss_fn(*eager_in), compiled(*comp_in)
    eager_loss.backward()
    comp_loss.backward()
    torch.testing.assert_close(comp_loss, eager_loss)
    for i, (a, b) in enumerate(zip(comp_in, eager_in)):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            assert (a.grad is None) == (b.grad is None), f"input {i}: gradient only in one of compiled / eager"
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"input {i}: {m}")
