"""What a linear projection is, in one place: ``nn.Linear`` or GPT-2's ``Conv1D`` (transformers),
which stores its weight ``[in, out]``."""
from __future__ import annotations

from torch import Tensor, nn


def _conv1d() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_projection(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, _conv1d()))


def linear_weight(module: nn.Module) -> Tensor:
    """A projection's weight as ``[out, in]``: ``nn.Linear``'s own, a view of a ``Conv1D``'s."""
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, _conv1d()):
        return module.weight.t()
    raise TypeError(f"expected a projection (nn.Linear or GPT-2's Conv1D), got {type(module).__name__}")


def out_features(module: nn.Module) -> int:
    if hasattr(module, "out_features"):  # nn.Linear and its subclasses (quantised ones too)
        return module.out_features
    return linear_weight(module).shape[0]
