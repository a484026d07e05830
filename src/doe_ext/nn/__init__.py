"""nn.Module wrappers: each owns its parameters and calls a fused op (or, with
``reference=True``, the op's plain-PyTorch twin: the same module as a test oracle)."""
from doe_ext.nn.knowledge_attention import KnowledgeAttention
from doe_ext.nn.dual_embedding import DualInputEmbedding, TokenEmbedding
from doe_ext.nn.multi_lora_linear import MultiLoRALinear
from doe_ext.nn.expert_loss import ExpertLoss
from doe_ext.nn.vae_relu_router import SparsityController, VAEReLURouter
from doe_ext.nn.knowledge_path import KnowledgePath, KnowledgeStep  # after the modules it builds on
from doe_ext.nn.streaming import plain_linears, streaming_linears
from doe_ext.nn.lean import LEAN_FAMILIES, LeanDecoder

__all__ = ["KnowledgeAttention", "DualInputEmbedding", "TokenEmbedding", "MultiLoRALinear", "VAEReLURouter", "ExpertLoss", "SparsityController",
           "KnowledgePath", "KnowledgeStep", "plain_linears",
           "streaming_linears", "LeanDecoder", "LEAN_FAMILIES"]
