"""Checks the fake (meta) kernels repeat from the C++ ones, with the same messages: a mixed-device
call dispatches to the fake kernel when one argument lives on the meta device."""
from __future__ import annotations

import torch


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == ref.device,
                         lambda: f"{op}: expected `{name}` on {ref.device} (the device of `{ref_name}`), got {t.device}")
