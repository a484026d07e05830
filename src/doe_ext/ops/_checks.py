"""Checks the public functions make in Python, and the bridge that runs the C++ kernels' own checks
for the fake (meta) kernels (a mixed-device call with one ``meta`` argument dispatches to the fake
kernel, which must reject it as the C++ kernels reject a CPU / CUDA mix)."""
from __future__ import annotations

import torch


def _hint(size) -> int | None:
    """A size as an int: a symbolic size's hint (no guard is added), None when it has none."""
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return None if hint is None else int(hint)


def cxx_checks(op: str, *tensors: torch.Tensor | None, ints=(), floats=(), text: str = "") -> None:
    """Run ``op``'s C++ argument checks, the ones its CPU and CUDA kernels run first, for its fake
    kernel: on meta stand-ins of ``tensors`` (the op's tensor arguments in schema order), each
    standing for its tensor's device (``torch.ops.doe_ext._check``). So ``torch.compile`` (and a call
    with a ``meta`` argument) rejects what eager rejects, with the same message. Symbolic sizes are
    checked at their hints; a size without one (data-dependent) leaves the checks to the kernel."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        stand_ins, devices = [], []
        for t in tensors:
            devices.append("" if t is None else str(t.device))
            if t is None:
                stand_ins.append(None)
                continue
            shape, stride = [_hint(s) for s in t.shape], [_hint(s) for s in t.stride()]
            if None in shape or None in stride:
                return
            stand_ins.append(torch.empty_strided(shape, stride, dtype=t.dtype, device="meta"))
        torch.ops.doe_ext._check(op, stand_ins, ",".join(devices), [int(i) for i in ints],
                                 [float(f) for f in floats], text)


def check_tensors(op: str, optional: tuple[str, ...] = (), **args) -> None:
    """Every argument a Tensor (those named in ``optional`` may be None): a TypeError naming it."""
    for name, t in args.items():
        if t is None and name in optional:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: expected `{name}` to be a Tensor{' or None' if name in optional else ''}, "
                            f"got {type(t).__name__}")


def check_float(op: str, name: str, value, optional: bool = False) -> float | None:
    """A real number (int or float, not bool) as float; None passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: expected `{name}` to be a float{' or None' if optional else ''}, got {value!r}")
    return float(value)
