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


def cxx_checks(op: str, *args) -> None:
    """Run raw op ``op``'s C++ argument checks, the ones its CPU and CUDA kernels run first, for its
    fake kernel: ``torch.ops.doe_ext._check_<op>`` with the op's own arguments ``args`` (schema order),
    each tensor replaced by a meta stand-in that reports its tensor's device. So ``torch.compile`` (and
    a call with a ``meta`` argument) rejects what eager rejects, with the same message. Symbolic sizes
    are checked at their hints; a size without one (data-dependent) leaves the checks to the kernel."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        stand_ins = []
        for a in args:
            if isinstance(a, torch.Tensor):
                shape, stride = [_hint(s) for s in a.shape], [_hint(s) for s in a.stride()]
                if None in shape or None in stride:
                    return
                a = torch.empty_strided(shape, stride, dtype=a.dtype, device="meta")
            stand_ins.append(a)
        # one entry per tensor argument (a None: an optional tensor left out, or a required one missing)
        devices = ",".join("" if a is None else str(a.device) for a in args if a is None or isinstance(a, torch.Tensor))
        getattr(torch.ops.doe_ext, f"_check_{op}")(devices, *stand_ins)


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
