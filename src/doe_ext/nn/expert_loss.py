from __future__ import annotations

from torch import Tensor, nn

from doe_ext.ops import expert_loss
from doe_ext.reference import expert_loss_ref


class ExpertLoss(nn.Module):
    """L_expert (DoE eq. 4, App. A.5): the router's logits against the Stage-1 LDA labels.

    ``forward(logits [..., K], target)`` with int64 topic ids ``[...]`` (``ignore_index`` = unlabeled)
    or a float topic distribution ``[..., K]`` (the document's theta); see
    :func:`doe_ext.ops.expert_loss`. ``reference=True`` runs the plain-PyTorch twin.
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 reference: bool = False):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f'ExpertLoss: reduction must be "mean", "sum" or "none", got "{reduction}"')
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"ExpertLoss: label_smoothing must be in [0, 1], got {label_smoothing}")
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.reference = reference

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        fn = expert_loss_ref if self.reference else expert_loss
        return fn(logits, target, ignore_index=self.ignore_index, reduction=self.reduction,
                  label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction}, label_smoothing={self.label_smoothing}"
