"""doe_ext: C++/CUDA ops, modules and models for knowledge-driven mixture-of-experts LMs.

Importing the package loads the compiled ops library (``doe_ext._C``), which registers every op
under ``torch.ops.doe_ext``, and the Python side of each op (fake kernels and autograd). Every other
submodule (``nn``, ``models``, ``lda``, ``dmoe``, ...) is imported on first use, so that Stage 1 and
the CLI never pay for transformers. The DoE model is still registered with transformers'
AutoConfig / AutoModel / AutoModelForCausalLM: when transformers' Auto classes are first imported
(or at once, if they already are), see :mod:`doe_ext._auto`. The ``doe-ext`` command alone defers
all of it (:func:`load`) until its arguments have parsed, so that ``--help`` needs no torch.
"""
from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"
_SUBMODULES = ("analysis", "demo", "dmoe", "integrations", "lda", "losses", "models", "nn", "reference", "testing",
               "threads")
__all__ = ["build_info", "load", "ops", "__version__", *_SUBMODULES]


def load() -> None:
    """What ``import doe_ext`` does: import torch, load ``doe_ext._C`` (registering
    ``torch.ops.doe_ext.*``) and the ops' Python side, and register the DoE model with transformers'
    Auto classes. Only the ``doe-ext`` command (:mod:`doe_ext_cli`) defers it, until a command runs."""
    if "ops" in globals():
        return
    import torch  # noqa: F401  (_C links libtorch)

    importlib.import_module("doe_ext._C")  # registers torch.ops.doe_ext.*
    globals()["ops"] = importlib.import_module("doe_ext.ops")
    importlib.import_module("doe_ext._auto").install()


if not getattr(sys.modules.get("doe_ext_cli"), "DEFER", False):
    load()


def __getattr__(name: str):
    if name == "ops":
        load()
        return globals()["ops"]
    if name in _SUBMODULES:
        return importlib.import_module(f"doe_ext.{name}")
    raise AttributeError(f"module 'doe_ext' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))


def build_info() -> dict:
    """What this installation was built with and runs on.

    Returns a dict: ``version``, ``torch`` (the running torch), ``cuda_kernels`` (whether CUDA
    kernels are compiled into ``_C``), ``cuda_archs`` (their architectures, e.g. ``["80", "90"]``),
    ``torch_cuda`` (torch's CUDA version or None), ``cuda_available``, ``cpu_capability``
    (the SIMD level ATen dispatches to, e.g. ``"AVX512"``), ``abi`` (``"stable"``: ``_C`` uses
    only the LibTorch stable ABI), ``torch_target`` (the oldest torch it loads in, e.g. ``"2.10"``)
    and ``torch_built`` (the torch whose headers built it; any torch from ``torch_target`` on runs it),
    ``threads`` (torch's intra-op threads, which the ops share) and ``openmp`` (the OpenMP runtimes
    loaded in the process: one, torch's, is expected; :mod:`doe_ext.threads`).
    """
    import torch

    from doe_ext.threads import openmp_runtimes

    cfg = dict(kv.split("=", 1) for kv in torch.ops.doe_ext._build_config().split(";"))
    return {
        "version": __version__,
        "torch": torch.__version__,
        "cuda_kernels": cfg["cuda"] == "1",
        "cuda_archs": [a for a in cfg["archs"].split(",") if a],
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "abi": cfg["abi"],
        "torch_target": cfg["torch_target"],
        "torch_built": cfg["torch_built"],
        "threads": torch.get_num_threads(),
        "openmp": openmp_runtimes(),
    }
