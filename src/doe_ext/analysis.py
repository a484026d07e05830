"""Analysis hooks for DoE models: what the papers' figures show, measured on your model.

- :func:`gate_activations_by_label`: per-layer, per-block gate activation by a label such as the
  domain, over a dataset (DoE Fig. 2 / Fig. 6).
- :class:`UtilizationTracker`: the coefficient of variation of block utilisation over training (Fig. 4).
- :func:`block_gradient_norms`: per-block gradient norms during a fine-tune (Fig. 7, "gradient
  isolation": a block whose gate is exactly zero gets exactly zero gradient).
- :func:`topic_alignment`, :func:`normalized_mutual_info`: how Stage 1's topics line up with labels
  the LDA never saw (the GCIDE domain).
- ``plot_*``: matplotlib figures written to PNG.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from doe_ext.models.modeling_doe import KnowledgeFFN, RouterOutput, TopKMoE


def _knowledge_ffns(model: nn.Module) -> list[KnowledgeFFN]:
    ffns = [m for m in model.modules() if isinstance(m, KnowledgeFFN)]
    if not ffns:
        raise ValueError(f"{type(model).__name__} has no DoE knowledge path (router='none', knowledge=False "
                         "or a non-DoE model): there are no gates to analyse")
    return ffns


@torch.no_grad()
def gate_activations_by_label(model: nn.Module, batches: Iterable[dict], label_key: str = "label"
                              ) -> dict[Hashable, dict[str, Tensor]]:
    """Average gate activity per label, layer and block.

    Each batch is a dict of model inputs (``input_ids``, ``topic_ids``, ``attention_mask`` ...) plus
    ``batch[label_key]``: one label for the whole batch, or a sequence of one label per row. Padding
    positions (``attention_mask == 0``) are left out.

    Returns ``{label: {"mean": [L, K] mean gate value, "active": [L, K] share of tokens whose gate is
    > 0, "tokens": int}}`` over the routed layers, in layer order.
    """
    ffns = _knowledge_ffns(model)
    captured: list[Tensor] = []
    hooks = [f.register_forward_hook(lambda m, a, out: captured.append(out[1].gates) if isinstance(out[1], RouterOutput)
                                     else None) for f in ffns]
    sums: dict = defaultdict(lambda: {"mean": 0.0, "active": 0.0, "tokens": 0})
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = dict(batch)
            labels = batch.pop(label_key)
            captured.clear()
            model(**batch)
            gates = torch.stack(captured)  # (L, B, T, K)
            mask = batch.get("attention_mask")
            valid = torch.ones(gates.shape[1:3], dtype=torch.bool) if mask is None else mask.bool()
            rows = [labels] * gates.shape[1] if isinstance(labels, Hashable) and not isinstance(labels, (list, tuple)) \
                else list(labels)
            for b, label in enumerate(rows):
                g = gates[:, b][:, valid[b]]  # (L, n, K)
                s = sums[label]
                s["mean"] = s["mean"] + g.sum(1)
                s["active"] = s["active"] + (g > 0).sum(1)
                s["tokens"] += g.shape[1]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {label: {"mean": s["mean"] / max(s["tokens"], 1), "active": s["active"] / max(s["tokens"], 1),
                    "tokens": s["tokens"]} for label, s in sums.items()}


class UtilizationTracker:
    """Block-utilisation CV per layer over training steps (Fig. 4): call :meth:`update` with each
    step's ``output.aux``; ``history`` is ``[steps, layers]``."""

    def __init__(self):
        self.steps: list[list[float]] = []

    def update(self, aux: dict) -> None:
        self.steps.append([float(layer["block_cv"]) for layer in aux["layers"]])

    @property
    def history(self) -> Tensor:
        return torch.tensor(self.steps)


def block_gradient_norms(model: nn.Module) -> dict[str, Tensor]:
    """Per-block gradient norms after a backward (Fig. 7).

    ``"knowledge_state"``: ``[K]`` the norm of each row of Z's gradient. With ``blocks="ffn"``,
    ``"block_ffn"``: ``[L, K]`` the norm of each layer's block-FFN gradients per block (exactly 0 for a
    block whose gate was zero for every token). For the top-k MoE baseline, ``"moe_experts"``:
    ``[L, E]`` the norm of each expert's gradients. Missing gradients count as 0.
    """
    def norm(params) -> Tensor:
        return torch.stack([p.grad.detach().square().sum() if p.grad is not None else torch.zeros(())
                            for p in params]).sum().sqrt().cpu()

    moes = [m for m in model.modules() if isinstance(m, TopKMoE)]
    if moes:
        return {"moe_experts": torch.stack([torch.stack([norm(e.parameters()) for e in m.experts]) for m in moes])}
    out = {}
    z = next((p for n, p in model.named_parameters() if n.endswith("knowledge_state")), None)
    if z is not None:
        out["knowledge_state"] = torch.zeros(z.shape[0]) if z.grad is None else z.grad.detach().norm(dim=1).cpu()
    rows = []
    for ffn in _knowledge_ffns(model):
        if ffn.blocks == "ffn":
            g_up = ffn.block_up.grad if ffn.block_up.grad is not None else torch.zeros_like(ffn.block_up)
            g_down = ffn.block_down.grad if ffn.block_down.grad is not None else torch.zeros_like(ffn.block_down)
            rows.append((g_up.detach().flatten(1).square().sum(1) + g_down.detach().flatten(1).square().sum(1)).sqrt().cpu())
    if rows:
        out["block_ffn"] = torch.stack(rows)
    return out


def _figure(figsize):
    """A matplotlib Figure outside pyplot: no global backend switch, nothing left open; it shows
    inline when a notebook cell returns it and saves with any backend."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def _finish(fig, path: str | Path | None):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def plot_heatmap(rows: dict[Hashable, Tensor], path: str | Path | None = None, xlabel: str = "", title: str = ""):
    """Labels x columns heatmap (one row of values per label); returns the Figure, written to ``path``
    (PNG) when given."""
    labels = list(rows)
    grid = torch.stack([torch.as_tensor(rows[lb], dtype=torch.float32) for lb in labels]).numpy()
    fig, ax = _figure((max(6, grid.shape[1] / 8), 1 + 0.5 * len(labels)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(labels)), [str(lb) for lb in labels])
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return _finish(fig, path)


def plot_gate_heatmap(activations: dict[Hashable, dict[str, Tensor]], path: str | Path | None = None, layer: int = 0,
                      stat: str = "active", title: str | None = None):
    """Labels x blocks heatmap of one layer's gate activity (Fig. 2 / 6); returns the Figure, written to
    ``path`` (PNG) when given."""
    return plot_heatmap({lb: a[stat][layer] for lb, a in activations.items()}, path, "knowledge block",
                        title or f"layer {layer}: {'share of tokens with gate > 0' if stat == 'active' else 'mean gate'}")


def topic_alignment(theta, labels: list[Hashable]) -> dict[Hashable, Tensor]:
    """Mean document-topic distribution per label (e.g. each GCIDE domain's mean ``theta [K]``): how
    Stage 1's topics line up with labels the LDA never saw. ``theta``: ``[D, K]``, one row per document."""
    theta = torch.as_tensor(theta, dtype=torch.float64)
    if theta.dim() != 2 or theta.shape[0] != len(labels):
        raise ValueError(f"topic_alignment: `theta` must be [documents, topics] with one row per label, got "
                         f"{tuple(theta.shape)} for {len(labels)} labels")
    out = {}
    for lb in dict.fromkeys(labels):
        rows = torch.tensor([i for i, x in enumerate(labels) if x == lb])
        out[lb] = theta[rows].mean(0).float()
    return out


def normalized_mutual_info(a: Iterable[Hashable], b: Iterable[Hashable]) -> float:
    """``I(a; b) / ((H(a) + H(b)) / 2)`` of two labelings of the same items (e.g. each document's
    dominant topic and its domain), in [0, 1]; the arithmetic normalisation of scikit-learn's
    ``normalized_mutual_info_score``. 1.0 when both labelings are constant."""
    import numpy as np

    a, b = list(a), list(b)
    if len(a) != len(b) or not a:
        raise ValueError(f"normalized_mutual_info: `a` and `b` must label the same non-empty items, got "
                         f"{len(a)} and {len(b)}")
    _, ia = np.unique(np.asarray(a, dtype=object).astype(str), return_inverse=True)
    _, ib = np.unique(np.asarray(b, dtype=object).astype(str), return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(joint, (ia, ib), 1.0)
    joint /= len(a)
    pa, pb = joint.sum(1), joint.sum(0)
    h = lambda p: float(-(p[p > 0] * np.log(p[p > 0])).sum())  # noqa: E731
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    denom = (h(pa) + h(pb)) / 2
    return 1.0 if denom == 0 else max(0.0, min(1.0, mi / denom))


def plot_curves(curves: dict[str, list[float] | Tensor], path: str | Path | None = None, xlabel: str = "step",
                ylabel: str = "", title: str = "", logy: bool = False):
    """Line plot of named curves (loss, utilisation CV per layer, ...); returns the Figure, written to
    ``path`` (PNG) when given."""
    fig, ax = _figure((7, 4))
    for name, ys in curves.items():
        ax.plot(list(map(float, ys)), label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    return _finish(fig, path)


def smooth(xs, k: int = 20):
    """A moving average of ``xs`` over ``k`` points (fewer when ``xs`` is shorter): a loss curve to plot."""
    xs = np.asarray(xs, dtype=float)
    k = max(1, min(k, len(xs)))
    return np.convolve(xs, np.ones(k) / k, mode="valid")
