"""Loss combinators of the DoE objective (eq. 4, App. A.5, App. H.3)."""
from __future__ import annotations

from torch import Tensor


def composite_loss(ntp: Tensor, expert: Tensor, alpha: float = 0.001, vae: Tensor | None = None,
                   beta: float = 0.0) -> Tensor:
    """``(1 - alpha) * L_ntp + alpha * L_expert`` (DoE eq. 4; the paper trains with ``alpha = 0.001``).

    The 3-component variant of App. H.3 adds ``beta * vae`` where ``vae`` is the router's
    ``kl + recon`` (mean over tokens; see :class:`doe_ext.nn.VAEReLURouter` with ``decoder=True``).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"composite_loss: expected `alpha` in [0, 1], got {alpha}")
    if beta < 0.0 or (beta > 0.0 and vae is None):
        raise ValueError(f"composite_loss: `beta` must be >= 0 and needs `vae` (the router's KL + recon), "
                         f"got beta={beta}, vae={'None' if vae is None else 'a tensor'}")
    total = (1 - alpha) * ntp + alpha * expert
    return total + beta * vae if vae is not None and beta > 0.0 else total
