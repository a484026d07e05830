"""Checks the public functions and the fake (meta) kernels make in Python, with the C++ kernels'
wording: a mixed-device call dispatches to the fake kernel when one argument lives on the meta
device, so the fake kernels repeat the device check (and reject the call, as the C++ kernels do)."""
from __future__ import annotations

import torch


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == ref.device,
                         lambda: f"{op}: expected `{name}` on {ref.device} (the device of `{ref_name}`), got {t.device}")


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
