from __future__ import annotations

import torch
from torch import Tensor, nn

from doe_ext.ops import knowledge_attention
from doe_ext.reference import knowledge_attention_ref


class KnowledgeAttention(nn.Module):
    """The AGC's knowledge attention (DoE §3.4, eq. 1-3).

    ``H_enriched = H + softmax((H W_q) Z_key^T / sqrt(d_key)) Z``, with ``Z [K, d_model]`` the
    learned knowledge state (one row per knowledge block; the composed expert ``G·Z`` reads it too).

    Args:
        d_model: width of the hidden state ``H``.
        num_topics: K, the number of knowledge blocks (rows of ``Z``).
        d_key: query/key width; defaults to ``d_model``.
        tie_key_value: the paper's setting, keys and values are both ``Z`` (needs
            ``d_key == d_model``). False gives keys their own ``[K, d_key]`` table.
        shared_state: the module owns only ``W_q``; ``Z`` is passed to :meth:`forward` (a model
            whose layers all read one knowledge state, and compose experts from it).
        reference: run the plain-PyTorch twin instead of the fused op.
    """

    def __init__(self, d_model: int, num_topics: int, d_key: int | None = None,
                 tie_key_value: bool = True, shared_state: bool = False, reference: bool = False):
        super().__init__()
        d_key = d_model if d_key is None else d_key
        if d_model < 1 or num_topics < 1 or d_key < 1:
            raise ValueError(f"KnowledgeAttention: d_model, num_topics and d_key must be >= 1, "
                             f"got d_model={d_model}, num_topics={num_topics}, d_key={d_key}")
        if tie_key_value and d_key != d_model:
            raise ValueError(f"KnowledgeAttention: tie_key_value=True needs d_key == d_model ({d_model}), "
                             f"got d_key={d_key}; pass tie_key_value=False for a separate key table")
        self.d_model, self.num_topics, self.d_key = d_model, num_topics, d_key
        self.tie_key_value = tie_key_value
        self.reference = reference
        self.w_q = nn.Linear(d_model, d_key, bias=False)  # W_{Q_know}, eq. 1
        self.Z = None if shared_state else nn.Parameter(torch.empty(num_topics, d_model))  # the knowledge state
        self.z_key = None if tie_key_value else nn.Parameter(torch.empty(num_topics, d_key))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.w_q.reset_parameters()
        if self.Z is not None:
            nn.init.normal_(self.Z, std=self.d_model ** -0.5)
        if self.z_key is not None:
            nn.init.normal_(self.z_key, std=self.d_key ** -0.5)

    def forward(self, h: Tensor, state: Tensor | None = None,
                return_probs: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``h [..., d_model]`` -> ``H_enriched [..., d_model]`` (and ``probs [..., K]`` if asked).
        ``state [K, d_model]``: the knowledge state, given exactly when ``shared_state=True``."""
        if (state is None) != (self.Z is not None):
            raise ValueError("KnowledgeAttention: pass `state` exactly when the module was built with "
                             f"shared_state=True (here shared_state={self.Z is None})")
        z = self.Z if state is None else state
        attend = knowledge_attention_ref if self.reference else knowledge_attention
        z_key = z if self.z_key is None else self.z_key
        return attend(self.w_q(h), z_key, z, residual=h, return_probs=return_probs)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_topics={self.num_topics}, d_key={self.d_key}, "
                f"tie_key_value={self.tie_key_value}")
