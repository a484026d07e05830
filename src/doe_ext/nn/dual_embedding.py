from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from doe_ext.ops import dual_embedding
from doe_ext.reference import dual_embedding_ref


class TokenEmbedding(nn.Module):
    """The token part of a :class:`DualInputEmbedding` as a module of its own, ``E_tok[ids]``: what a
    model with a dual embedding returns from transformers' ``get_input_embeddings()``. Its output,
    passed back as ``inputs_embeds`` with the same ``topic_ids``, gives what ``input_ids`` give (the
    model adds the topic part, as a multimodal model adds its image features). It owns no parameter:
    ``weight`` is the owner's ``token_weight``, so the state dict and tying are unchanged."""

    def __init__(self, owner: "DualInputEmbedding"):
        super().__init__()
        self._owner = (owner,)  # in a tuple: not registered as a child (no cycle in named_modules)

    @property
    def weight(self) -> nn.Parameter:
        return self._owner[0].token_weight

    @property
    def padding_idx(self) -> int | None:
        return self._owner[0].padding_idx

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, token_ids: Tensor) -> Tensor:
        return F.embedding(token_ids, self.weight, self.padding_idx)


class DualInputEmbedding(nn.Module):
    """The dual-input embedding of DoE §3.3 (Algorithm 1): ``[E_tok[token]; E_know[topic]]``.

    Each token's embedding is concatenated with the embedding of its Stage-1 LDA topic (``-1``:
    unlabeled, a zero topic part). With ``project=True`` a bias-free linear map brings the
    ``d_model + topic_dim`` features back to ``d_model`` so the module drops into a model of fixed
    width; it starts as ``[I | 0]``, so the output is exactly the token embedding until training
    moves it, and the module can replace a pretrained model's embedding without changing its
    function (see :meth:`from_pretrained`).

    Args:
        vocab_size: V, rows of the token table.
        d_model: token embedding width (and output width with ``project=True``).
        num_topics: K, rows of the topic table (the LDA topic count).
        topic_dim: topic embedding width ``d_k``.
        project: add the ``[d_model + topic_dim] -> [d_model]`` projection.
        padding_idx: as ``nn.Embedding``: that token row gets no gradient.
        reference: run the plain-PyTorch twin instead of the fused op.
    """

    def __init__(self, vocab_size: int, d_model: int, num_topics: int, topic_dim: int, project: bool = True,
                 padding_idx: int | None = None, reference: bool = False):
        super().__init__()
        if min(vocab_size, d_model, num_topics, topic_dim) < 1:
            raise ValueError(f"DualInputEmbedding: sizes must be >= 1, got vocab_size={vocab_size}, "
                             f"d_model={d_model}, num_topics={num_topics}, topic_dim={topic_dim}")
        if padding_idx is not None and not -vocab_size <= padding_idx < vocab_size:
            raise ValueError(f"DualInputEmbedding: padding_idx={padding_idx} outside [-{vocab_size}, {vocab_size})")
        self.vocab_size, self.d_model, self.num_topics, self.topic_dim = vocab_size, d_model, num_topics, topic_dim
        self.padding_idx = None if padding_idx is None else padding_idx % vocab_size
        self.reference = reference
        self.token_weight = nn.Parameter(torch.empty(vocab_size, d_model))  # E_tok
        self.topic_weight = nn.Parameter(torch.empty(num_topics, topic_dim))  # E_know
        self.proj = nn.Linear(d_model + topic_dim, d_model, bias=False) if project else None
        self.tokens = TokenEmbedding(self)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.token_weight)  # nn.Embedding's init
        nn.init.normal_(self.topic_weight)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.token_weight[self.padding_idx].zero_()
        if self.proj is not None:
            with torch.no_grad():  # [I | 0]: output == token embedding, whatever the topic part
                self.proj.weight.zero_()
                self.proj.weight[:, :self.d_model].copy_(torch.eye(self.d_model))

    @classmethod
    def from_pretrained(cls, embedding: nn.Embedding, num_topics: int, topic_dim: int, **kwargs) -> "DualInputEmbedding":
        """A projected dual embedding whose token table is a copy of ``embedding``'s weight: at
        initialisation it computes exactly what ``embedding`` did."""
        kwargs.setdefault("padding_idx", embedding.padding_idx)
        w = embedding.weight
        module = cls(w.shape[0], w.shape[1], num_topics, topic_dim, project=True, **kwargs)
        module = module.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            module.token_weight.copy_(w)
        return module

    def forward(self, token_ids: Tensor, topic_ids: Tensor | None = None) -> Tensor:
        """``token_ids, topic_ids [...]`` (topic ids None: all unlabeled) -> ``[..., d_model]``
        (``[..., d_model + topic_dim]`` without the projection)."""
        if topic_ids is None:
            topic_ids = torch.full_like(token_ids, -1)
        embed = dual_embedding_ref if self.reference else dual_embedding
        h = embed(token_ids, topic_ids, self.token_weight, self.topic_weight, padding_idx=self.padding_idx)
        return h if self.proj is None else self.proj(h)

    @property
    def weight(self) -> nn.Parameter:
        """The token table under the name transformers expects of an input embedding (tying,
        resizing): ``token_weight``."""
        return self.token_weight

    def combine(self, token_embeds: Tensor, topic_ids: Tensor | None = None, topic_scale: float | Tensor = 1.0) -> Tensor:
        """:meth:`forward` from the token part ``token_embeds [..., d_model]`` (``token_weight[ids]``, or
        any embedding a caller computed: Hugging Face's ``inputs_embeds``) and ``topic_ids [...]``.
        ``topic_scale`` multiplies the topic part (a scaled token embedding's scale, so that the result
        is the scaled dual embedding: the projection is linear)."""
        if token_embeds.shape[-1] != self.d_model:
            raise ValueError(f"DualInputEmbedding.combine: `token_embeds` must end in d_model={self.d_model}, got "
                             f"{tuple(token_embeds.shape)}")
        if topic_ids is None:
            topic_ids = torch.full(token_embeds.shape[:-1], -1, dtype=torch.long, device=token_embeds.device)
        topic = F.embedding(topic_ids.clamp(min=0), self.topic_weight) * (topic_ids >= 0)[..., None].to(token_embeds.dtype)
        h = torch.cat([token_embeds, (topic * topic_scale).to(token_embeds.dtype)], dim=-1)
        return h if self.proj is None else self.proj(h)

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, d_model={self.d_model}, num_topics={self.num_topics}, "
                f"topic_dim={self.topic_dim}, project={self.proj is not None}, padding_idx={self.padding_idx}")
