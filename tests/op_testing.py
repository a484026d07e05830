"""Helpers every op test shares: devices and dtypes of the contract, low-precision error bounds,
and leaf copies of sample inputs."""
from __future__ import annotations

import pytest
import torch

from doe_ext.selftest import close_to_reference

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))]
CPU_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (device, dtype) pairs of the contract: CPU float32/float64/float16/bfloat16, CUDA float32/float16/bfloat16.
DEVICE_DTYPES = [pytest.param("cpu", dt, id=f"cpu-{str(dt)[6:]}") for dt in CPU_DTYPES] + [
    pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))
    for dt in CUDA_DTYPES
]


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


# float32/float64: tight tolerances; float16/bfloat16: at most 2x the reference's own error against
# float64 (flash-attention's rule). The shipped self-test uses the same function.
assert_close_to_reference = close_to_reference


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
