"""The modules ``doeify`` places inside a pretrained model (each keeps the original as ``base_layer``):
the dual-input embedding, the MLP behind DoE's knowledge path, the widened MLP input of
``fusion="concat"``, and the checkpoint function that carries the routers' outputs out of a
checkpointed layer. They read each forward's state from their wrapper's scope (:mod:`doe_ext.nn.scope`),
which :meth:`~doe_ext.integrations.hf.DoEWrapper.forward` opens around the base model's forward."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from doe_ext.integrations.hf.adapters import out_features
from doe_ext.nn import DualInputEmbedding, KnowledgeAttention
from doe_ext.nn.knowledge_path import KnowledgeStep, RouterOutput
from doe_ext.nn.scope import Scope


@dataclass
class ForwardState:
    """One forward of the wrapper: its knowledge-path step (:class:`~doe_ext.nn.knowledge_path.KnowledgeStep`)
    and what the wrapped modules inside the base model need to reach it. :meth:`DoEWrapper.forward`
    opens it as the wrapper's :attr:`~DoEWrapper.scope` around the base model's forward (the one way in,
    :mod:`doe_ext.nn.scope`); nothing carries over from one forward to the next."""

    step: KnowledgeStep
    batch_shape: tuple[int, int]  # (B, T) (OPT's MLP sees (B*T, d))
    signals: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, T, D) projection output
    expert: Tensor | None = None  # fusion="concat": e, read by the widened MLP input projections


class DoEEmbedding(nn.Module):
    """The base token embedding (``base_layer``) as DoE's dual-input embedding (§3.3):
    ``proj([base_layer(ids); s·E_know[topic]])`` with ``proj = [I | 0]`` at first and ``s`` the
    embedding's scale (gemma's ``embed_scale``; 1 otherwise), i.e. ``s·proj([E_tok; E_know])``.
    ``E_tok`` IS the base weight (shared, not copied), so a tied LM head stays tied. The topic part is
    added only to the forward's first call, which embeds the model's ``input_ids`` (GPT-2 then embeds
    ``token_type_ids`` with this table; those, and any call outside a wrapper's forward, get
    ``base_layer``'s output), or by :meth:`combine` to ``inputs_embeds``."""

    def __init__(self, base_layer: nn.Module, num_topics: int, topic_dim: int, scope: Scope[ForwardState]):
        super().__init__()
        self.base_layer = base_layer
        self.dual = DualInputEmbedding.from_pretrained(base_layer, num_topics, topic_dim)
        self.dual.token_weight = base_layer.weight
        self._scope = scope

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def combine(self, tokens: Tensor, topics: Tensor | None) -> Tensor:
        """The dual embedding from the token part ``tokens`` (``base_layer``'s output, or ``inputs_embeds``)."""
        scale = getattr(self.base_layer, "embed_scale", None)
        return self.dual.combine(tokens, topics, 1.0 if scale is None else scale)

    def forward(self, input_ids: Tensor) -> Tensor:
        tokens = self.base_layer(input_ids)
        call = self._scope.get()
        # the forward's first embedding of its tokens is the model's input (GPT-2 embeds token_type_ids after it)
        if call is None or call.step.embeds is not None or input_ids.numel() != call.batch_shape[0] * call.batch_shape[1]:
            return tokens
        topics = call.step.topic_ids
        call.step.embeds = self.combine(tokens, None if topics is None else topics.reshape(input_ids.shape))
        return call.step.embeds


class ConcatInput(nn.Module):
    """An MLP input projection widened for ``fusion="concat"``: ``W [h; e] = W_h h + W_e e`` with the
    original projection as ``W_h`` (``base_layer``) and a new ``W_e`` (``extra``). ``e`` is 0 at
    initialisation (Z = 0), so the widened MLP starts as the original."""

    def __init__(self, base_layer: nn.Module, d: int, scope: Scope[ForwardState]):
        super().__init__()
        self.base_layer = base_layer
        w = next(base_layer.parameters())
        self.extra = nn.Linear(d, out_features(base_layer), bias=False, device=w.device, dtype=w.dtype)
        self._scope = scope

    def forward(self, h: Tensor) -> Tensor:
        out = self.base_layer(h)
        call = self._scope.get()
        e = call.expert if call is not None else None
        return out if e is None else out + self.extra(e)


class DoEMLP(nn.Module):
    """A decoder layer's MLP (``base_layer``) behind DoE's knowledge path: it receives H_mha, runs the
    layer's step of the knowledge path (its own ``W_q`` and ``W_s``; Z, the routers and the prior are
    the wrapper's :class:`KnowledgePath`), and hands the MLP ``h_enr + e`` (``fusion="add"``) or
    ``[h_enr; e]`` (``"concat"``, via ConcatInput)."""

    def __init__(self, base_layer: nn.Module, layer_idx: int, d: int, num_topics: int, signal_dim: int,
                 fusion: str, scope: Scope[ForwardState]):
        super().__init__()
        self.base_layer = base_layer
        self.layer_idx, self.fusion = layer_idx, fusion
        w = next(base_layer.parameters())
        self.knowledge_attention = KnowledgeAttention(d, num_topics, shared_state=True)  # W_q; Z is the wrapper's
        self.knowledge_attention.to(device=w.device, dtype=w.dtype)
        self.signal_proj = (nn.Linear(signal_dim, d, bias=False, device=w.device, dtype=w.dtype)  # W_s
                            if signal_dim else None)
        self._scope = scope

    def forward(self, h: Tensor, *args, **kwargs) -> Tensor:
        call, i = self._scope.get(), self.layer_idx
        if call is None:
            raise RuntimeError("DoEMLP: runs inside a forward of its DoEWrapper (call the wrapper that doeify "
                               "returned, not the base model: the wrapper begins each forward's knowledge step)")
        flat = h.dim() == 2  # OPT flattens (B, T, d) to (B*T, d) before its MLP
        if flat:
            h = h.view(*call.batch_shape, h.shape[-1])
        h_enr, e, routed = call.step.layer(i, h, call.signals.get(i), self.knowledge_attention, self.signal_proj)
        if routed is not None:
            call.step.routed[i] = routed
        if flat:
            h_enr, e = h_enr.flatten(0, 1), e.flatten(0, 1)
        if self.fusion == "add":
            return self.base_layer(h_enr + e, *args, **kwargs)
        call.expert = e
        try:
            return self.base_layer(h_enr, *args, **kwargs)
        finally:
            call.expert = None


class RouterCheckpoint:
    """A decoder layer's checkpoint function (``checkpoint(fn, *args)``) whose checkpointed function
    also returns layer ``i``'s router tensors, which then come back with their gradient. The
    recomputation in the backward runs with the call of its own forward, even if other forwards
    came in between (gradient accumulation over several forwards before one backward)."""

    _doe_wrapped = True

    def __init__(self, checkpoint, i: int, scope: Scope[ForwardState]):
        self.checkpoint, self.i, self.scope = checkpoint, i, scope

    def __call__(self, fn, *args):
        shape, call = {}, self.scope.get()  # this forward's state

        def run(*inputs):
            with self.scope(call):
                out = fn(*inputs)
            outs = list(out) if isinstance(out, tuple) else [out]
            routed = call.step.routed.get(self.i)
            extra = [] if routed is None else [routed.gates, routed.logits, routed.kl] + (
                [] if routed.recon is None else [routed.recon])
            shape.update(tuple=isinstance(out, tuple), n=len(outs), extra=len(extra))
            return (*outs, *extra)

        res = self.checkpoint(run, *args)
        outs, extra = list(res[:shape["n"]]), list(res[shape["n"]:])
        if extra:  # the router's tensors as the checkpoint returned them: they carry the gradient
            call.step.routed[self.i] = RouterOutput(*extra)
        return tuple(outs) if shape["tuple"] else outs[0]
