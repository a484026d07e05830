"""Loss combinators of the DoE objective (eq. 4, App. A.5, App. H.3)."""
from __future__ import annotations

from torch import Tensor


def composite_loss(ntp: Tensor, expert: Tensor, alpha: float = 0.001) -> Tensor:
    """``(1 - alpha) * L_ntp + alpha * L_expert`` (DoE eq. 4; the paper trains with ``alpha = 0.001``).

    For the 3-component variant of App. H.3 add ``beta * (kl + recon)`` from the router's decoder.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"composite_loss: expected `alpha` in [0, 1], got {alpha}")
    return (1 - alpha) * ntp + alpha * expert
