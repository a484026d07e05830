"""Where experts sit and which ones a call uses.

:class:`ExpertSite` is the one object that knows where a model's experts sit: the MLP projections of
its last decoder layer (DMoE §3.2, the default) or of its last few layers (Table 3's variant). It
wraps those projections PEFT-style (:class:`ExpertLinear` keeps the original as ``base_layer``,
swapped in with ``setattr``; nothing is monkeypatched), knows their shapes, and, for the last layer,
recomputes the logits from the residual stream entering its MLP block, which is what lets DMoE predict
a position again with other experts without touching the KV cache.

:class:`ActiveExperts` says which experts each row of one call uses, with what weight; :func:`use_experts`
sets it for exactly the calls made inside its block (a :class:`~doe_ext.nn.scope.Scope`, so concurrent
threads and nested calls do not see each other's experts). Outside such a block a wrapped projection
is its base layer, bit for bit. The residual capture (:meth:`ExpertSite.capture`) is a scope too.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from doe_ext.dmoe.recipe import LoRAConfig
from doe_ext.integrations.hf.adapters import adapter_for, get_path
from doe_ext.nn.multi_lora_linear import lora_rows
from doe_ext.nn.projection import linear_weight
from doe_ext.nn.scope import Scope


@dataclass(frozen=True)
class FamilySpec:
    """What an :class:`ExpertSite` needs of a family beyond doeify's adapter (``adapter_for``: the
    decoder layers and their MLP), as dotted attribute paths.

    Args:
        mlp_norm: decoder layer -> the norm whose output the MLP takes (its input is the residual).
        projections: MLP -> the linear projections that carry experts (``nn.Linear`` or GPT-2's ``Conv1D``).
        final_norm: causal LM -> the norm before the LM head.
        post_mlp_norm: decoder layer -> a norm of the MLP's output before the residual add (Gemma's
            sandwich norms), or None.
    """

    mlp_norm: str
    projections: tuple[str, ...]
    final_norm: str
    post_mlp_norm: str | None = None


_GATED = ("gate_proj", "up_proj", "down_proj")
_LLAMA = FamilySpec("post_attention_layernorm", _GATED, "model.norm")
FAMILIES: dict[str, FamilySpec] = {
    "llama": _LLAMA, "qwen2": _LLAMA, "mistral": _LLAMA,
    "gpt2": FamilySpec("ln_2", ("c_fc", "c_proj"), "transformer.ln_f"),
    "gemma3_text": FamilySpec("pre_feedforward_layernorm", _GATED, "model.norm", "post_feedforward_layernorm"),
}


def unwrap(module: nn.Module) -> nn.Module:
    """The projection inside any expert wrappers (``base_layer`` chains)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def set_linear_weight(module: nn.Module, weight: Tensor) -> None:
    """Copy ``weight [out, in]`` into a projection, in its own layout."""
    with torch.no_grad():
        linear_weight(unwrap(module)).copy_(weight)


@dataclass
class ExpertSet:
    """Stacked LoRA factors of ``N`` experts: per projection ``a [N, r, in]`` and ``b [N, out, r]``."""

    a: dict[str, Tensor]
    b: dict[str, Tensor]

    def to(self, device) -> "ExpertSet":
        return ExpertSet({n: t.to(device) for n, t in self.a.items()}, {n: t.to(device) for n, t in self.b.items()})

    @property
    def num_experts(self) -> int:
        return next(iter(self.a.values())).shape[0]

    @property
    def rank(self) -> int:
        return next(iter(self.a.values())).shape[1]

    def pad_rank(self, rank: int) -> "ExpertSet":
        """The same experts with zero rows of ``A`` and zero columns of ``B`` up to ``rank``: the same
        deltas ``B @ A``, stackable with LoRAs of that rank (a bank's knowledge reader)."""
        pad = rank - self.rank
        if pad <= 0:
            return self
        return ExpertSet({n: F.pad(t, (0, 0, 0, pad)) for n, t in self.a.items()},
                         {n: F.pad(t, (0, pad)) for n, t in self.b.items()})

    @classmethod
    def stack(cls, experts: Sequence[dict[str, Tensor]], names: Sequence[str]) -> "ExpertSet":
        """Expert tensor dicts (``"<name>.lora_a"`` / ``"<name>.lora_b"``) -> one set, in the given order;
        experts of a lower rank than the highest are padded with zeros (:meth:`pad_rank`)."""
        r = max(e[f"{names[0]}.lora_a"].shape[0] for e in experts)
        return cls(a={n: torch.stack([F.pad(e[f"{n}.lora_a"], (0, 0, 0, r - e[f"{n}.lora_a"].shape[0]))
                                      for e in experts]) for n in names},
                   b={n: torch.stack([F.pad(e[f"{n}.lora_b"], (0, r - e[f"{n}.lora_b"].shape[1]))
                                      for e in experts]) for n in names})


@dataclass
class ActiveExperts:
    """Which experts each row uses in one call.

    ``indices`` int64 ``[R, k]`` into ``experts`` (``-1``: empty slot) and ``scales [R, k]`` (LoRA's
    ``alpha / rank`` times the composition weight). ``R`` is either the number of rows the projection
    sees (tokens) or the batch size ``B`` of a ``[B, T, in]`` input (one set per sequence, shared by its
    tokens). Built by :meth:`per_row` (training: row ``r`` uses expert ``rows[r]``) or :meth:`from_sets`
    (inference: weighted sets of expert ids).
    """

    experts: ExpertSet
    indices: Tensor
    scales: Tensor

    @classmethod
    def per_row(cls, experts: ExpertSet, rows: Tensor, scale: float) -> "ActiveExperts":
        return cls(experts, rows[:, None], torch.full((len(rows), 1), scale, device=rows.device))

    @classmethod
    def from_sets(cls, sets: Sequence[Sequence[tuple[str, float]]], load: Callable[[list[str]], ExpertSet],
                  scale: float, device) -> "ActiveExperts | None":
        """Per row a list of ``(expert id, weight)``; ``load(ids)`` stacks the union of the ids once.
        Rows without experts get empty slots; no expert anywhere gives None."""
        union = list(dict.fromkeys(e for s in sets for e, _ in s))
        if not union:
            return None
        pos = {e: i for i, e in enumerate(union)}
        k = max(len(s) for s in sets)
        idx = torch.full((len(sets), k), -1, dtype=torch.long)
        scales = torch.zeros(len(sets), k)
        for r, s in enumerate(sets):
            for j, (e, w) in enumerate(s):
                idx[r, j], scales[r, j] = pos[e], scale * w
        return cls(load(union).to(device), idx.to(device), scales.to(device))

    def select(self, rows: Tensor) -> "ActiveExperts":
        return ActiveExperts(self.experts, self.indices[rows], self.scales[rows])


EXPERTS: Scope[ActiveExperts] = Scope("dmoe_experts")


def use_experts(active: ActiveExperts | None):
    """Run the wrapped projections with ``active`` for the calls made inside the block."""
    return EXPERTS(active)


class ExpertLinear(nn.Module):
    """A projection with per-row LoRA experts (``multi_lora_linear``); ``name`` is its key in an
    :class:`ExpertSet`. Without experts for that key it is ``base_layer``."""

    def __init__(self, base_layer: nn.Module, name: str):
        super().__init__()
        self.base_layer, self.name = base_layer, name

    def forward(self, x: Tensor) -> Tensor:
        active = EXPERTS.get()
        if active is None or self.name not in active.experts.a:
            return self.base_layer(x)
        idx, scales = active.indices, active.scales
        if idx.shape[0] != x.numel() // x.shape[-1]:  # one set per sequence of a [B, T, in] input
            if x.dim() != 3 or idx.shape[0] != x.shape[0]:
                raise ValueError(f"dmoe: the active experts have {idx.shape[0]} rows for an input of shape "
                                 f"{tuple(x.shape)}")
            idx = idx.repeat_interleave(x.shape[1], 0)
            scales = scales.repeat_interleave(x.shape[1], 0)
        inner = unwrap(self.base_layer)  # another site's wrapper may sit inside (unused in this call)
        return lora_rows(inner, x, active.experts.a[self.name], active.experts.b[self.name], idx, scales)


class ExpertSite:
    """Where a causal LM's experts sit: the MLP projections of its last ``depth`` decoder layers.

    Args:
        model: a causal LM of a family in :data:`FAMILIES`.
        depth: how many of the last decoder layers carry experts: ``1`` (DMoE's last layer, the default),
            an int, or a fraction of the layers in ``(0, 1]`` (Table 3: 0.25, 0.5).

    Experts on the last layer are keyed by projection name (``"down_proj"``); on several layers by
    ``"<layer>.<projection>"``. Only a last-layer site can predict a position again from the residual
    (:meth:`logits`) without touching the KV cache: deeper experts change the keys and values of every
    layer after them (:attr:`keeps_cache`).
    """

    def __init__(self, model: nn.Module, depth: int | float = 1):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in FAMILIES:
            raise ValueError(f"dmoe: model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
        spec, adapter = FAMILIES[model_type], adapter_for(model)
        layers = get_path(model, adapter.layers)
        L = len(layers)
        if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not (
                (isinstance(depth, int) and 1 <= depth <= L) or (isinstance(depth, float) and 0 < depth <= 1)):
            raise ValueError(f"ExpertSite: `depth` must be an int in [1, {L}] or a fraction in (0, 1], got {depth!r}")
        n = depth if isinstance(depth, int) else max(1, round(depth * L))
        self.model, self.num_layers, self.layer_ids = model, L, tuple(range(L - n, L))
        self.mlps = {i: get_path(layers[i], adapter.mlp) for i in self.layer_ids}
        self.projection_names = spec.projections
        self.keeps_cache = n == 1
        self.names = tuple(p if self.keeps_cache else f"{i}.{p}" for i in self.layer_ids for p in spec.projections)
        self._slots = {name: (self.mlps[i], p) for name, (i, p) in
                       zip(self.names, ((i, p) for i in self.layer_ids for p in spec.projections))}
        self.mlp: nn.Module = self.mlps[L - 1]
        self.mlp_norm: nn.Module = get_path(layers[L - 1], spec.mlp_norm)
        self.post_mlp_norm: nn.Module = get_path(layers[L - 1], spec.post_mlp_norm) if spec.post_mlp_norm else nn.Identity()
        self.final_norm: nn.Module = get_path(model, spec.final_norm)
        self.head: nn.Module = model.get_output_embeddings()
        if self.mlp_norm not in _TAPPED:  # the residual capture's reader, once per module
            self.mlp_norm.register_forward_pre_hook(_keep_residual)
            _TAPPED.add(self.mlp_norm)

    @property
    def stale_layer_share(self) -> float:
        """The share of the layers whose KV cache a change of experts makes stale."""
        return 0.0 if self.keeps_cache else len(self.layer_ids) / self.num_layers

    def modules(self) -> dict[str, nn.Module]:
        """Expert key -> the module now in that projection's place (a wrapper once attached)."""
        return {n: getattr(mlp, p) for n, (mlp, p) in self._slots.items()}

    def weights(self) -> dict[str, Tensor]:
        """Expert key -> the base projection's weight ``[out, in]``."""
        return {n: linear_weight(unwrap(m)) for n, m in self.modules().items()}

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Expert key -> ``(out, in)``."""
        return {n: tuple(w.shape) for n, w in self.weights().items()}

    def attach(self) -> "ExpertSite":
        """Wrap every projection in an :class:`ExpertLinear` of this site's key (idempotent; another
        site's wrapper may stay inside)."""
        for name, (mlp, p) in self._slots.items():
            m, keys = getattr(mlp, p), set()
            while isinstance(m, ExpertLinear):
                keys.add(m.name)
                m = m.base_layer
            if name not in keys:
                setattr(mlp, p, ExpertLinear(getattr(mlp, p), name))
        return self

    def detach(self) -> None:
        """Remove this site's wrappers wherever they sit in a chain of wrappers."""
        for name, (mlp, p) in self._slots.items():
            parent, attr, m = mlp, p, getattr(mlp, p)
            while isinstance(m, ExpertLinear):
                if m.name == name:
                    setattr(parent, attr, m.base_layer)
                    break
                parent, attr, m = m, "base_layer", m.base_layer

    def init_expert(self, cfg: LoRAConfig, generator: torch.Generator) -> dict[str, Tensor]:
        """A fresh expert as PEFT initialises LoRA: ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (kaiming-uniform
        with a = sqrt(5)), ``B = 0``, so it starts as the base model."""
        out = {}
        for name, (o, i) in self.shapes().items():
            out[f"{name}.lora_a"] = (torch.rand(cfg.rank, i, generator=generator) * 2 - 1) / i ** 0.5
            out[f"{name}.lora_b"] = torch.zeros(o, cfg.rank)
        return out

    # -- the last layer's MLP block, the final norm and the head -------------------------------------
    def hidden(self, residual: Tensor) -> Tensor:
        """The final hidden state (before the head) from the residual entering the last MLP block."""
        return self.final_norm(residual + self.post_mlp_norm(self.mlp(self.mlp_norm(residual))))

    def logits(self, residual: Tensor) -> Tensor:
        return self.head(self.hidden(residual))

    @contextlib.contextmanager
    def capture(self):
        """A block that keeps the residual entering the last MLP block of the forwards run inside it:
        ``with site.capture() as cap: model(...)``, then ``cap.value [B, T, d]`` (the last forward's)."""
        with RESIDUAL(Captured(self.mlp_norm)) as cap:
            yield cap

    @torch.no_grad()
    def verify(self) -> None:
        """Check on a probe that the model's logits are ``head(final_norm(r + post(mlp(mlp_norm(r)))))`` of
        the residual entering the last MLP block, which re-prediction and training rely on."""
        ids = (torch.arange(1, 6)[None] % self.model.config.vocab_size).to(next(self.model.parameters()).device)
        with self.capture() as cap:
            want = self.model(input_ids=ids, use_cache=False).logits
        got = self.logits(cap.value)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
            raise ValueError(f"dmoe: the last layer of {type(self.model).__name__} does not end with "
                             "out = r + mlp(mlp_norm(r)) followed by the final norm and the head; "
                             "its experts could not be applied after the last attention")


@dataclass
class Captured:
    """What :meth:`ExpertSite.capture` keeps: the input of ``module`` (the last layer's MLP norm)."""

    module: nn.Module
    value: Tensor | None = None


RESIDUAL: Scope[Captured] = Scope("dmoe_residual")
_TAPPED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _keep_residual(module: nn.Module, args) -> None:
    cap = RESIDUAL.get()
    if cap is not None and cap.module is module:
        cap.value = args[0]
