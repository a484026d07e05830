"""nn.Module wrappers: each owns its parameters and calls a fused op (or, with
``reference=True``, the op's plain-PyTorch twin: the same module as a test oracle)."""
from doe_ext.nn.knowledge_attention import KnowledgeAttention

__all__ = ["KnowledgeAttention"]
