"""Plain-PyTorch twins of every op: the test oracle, and a fallback to read when in doubt."""
from doe_ext.reference.knowledge_attention import knowledge_attention_ref

__all__ = ["knowledge_attention_ref"]
