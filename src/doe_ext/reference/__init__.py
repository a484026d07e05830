"""Plain-PyTorch twins of every op: the test oracle, and a fallback to read when in doubt."""
from doe_ext.reference.knowledge_attention import knowledge_attention_ref
from doe_ext.reference.dual_embedding import dual_embedding_ref
from doe_ext.reference.expert_loss import expert_loss_ref
from doe_ext.reference.vae_relu_router import vae_relu_router_ref
from doe_ext.reference.lora_merge import lora_merge_ref
from doe_ext.reference.decode_linear import decode_linear_ref
from doe_ext.reference.lean import lean_attention_ref, lean_mlp_ref, lean_qkv_ref
from doe_ext.reference.multi_lora_linear import multi_lora_linear_per_expert, multi_lora_linear_ref

__all__ = ["knowledge_attention_ref", "dual_embedding_ref", "vae_relu_router_ref", "expert_loss_ref", "lora_merge_ref", "multi_lora_linear_ref", "multi_lora_linear_per_expert",
           "decode_linear_ref", "lean_qkv_ref", "lean_attention_ref", "lean_mlp_ref"]
