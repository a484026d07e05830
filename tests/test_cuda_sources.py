"""The CUDA sources (compiled here, run only on a GPU): every kernel takes one params struct, as
flash-attention's do (issue 24, part 2), so a kernel's arguments are named fields, not a dozen
positional scalars that a call can silently swap."""
from __future__ import annotations

import re
from pathlib import Path

CUDA = Path(__file__).parents[1] / "csrc" / "cuda"
KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\(([^)]*)\)")


def kernels() -> dict[str, str]:
    """``{"file:kernel": "its parameter list"}`` of every ``__global__`` function under csrc/cuda."""
    found = {}
    for path in sorted(CUDA.glob("*.cu")):
        for name, params in KERNEL.findall(path.read_text()):
            found[f"{path.name}:{name}"] = " ".join(params.split())
    return found


def test_every_cuda_kernel_takes_one_params_struct():
    found = kernels()
    assert len(found) >= 12, found  # the parser sees the kernels (13 when this was written)
    bad = {k: p for k, p in found.items() if not re.fullmatch(r"const \w+Params(<T>)? p", p)}
    assert bad == {}, f"kernels with positional arguments: {bad}"
