"""Plain-PyTorch twins of every op: the test oracle, and a fallback to read when in doubt."""
from doe_ext.reference.knowledge_attention import knowledge_attention_ref
from doe_ext.reference.dual_embedding import dual_embedding_ref

__all__ = ["knowledge_attention_ref", "dual_embedding_ref"]
