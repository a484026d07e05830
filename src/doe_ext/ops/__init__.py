"""The fused ops of doe_ext: public functions over ``torch.ops.doe_ext.*``.

Each op is one module here: the public function (shapes in its docstring), its fake kernel for
``torch.compile`` and its autograd formula, both registered against the C++ schema.
"""
from doe_ext.ops.knowledge_attention import knowledge_attention
from doe_ext.ops.dual_embedding import dual_embedding
from doe_ext.ops.expert_loss import expert_loss
from doe_ext.ops.vae_relu_router import RouterStats, vae_relu_router
from doe_ext.ops.lora_merge import lora_merge, lora_merge_
from doe_ext.ops.multi_lora_linear import multi_lora_linear
from doe_ext.ops.decode_linear import decode_linear

__all__ = ["knowledge_attention", "dual_embedding", "vae_relu_router", "RouterStats", "expert_loss", "lora_merge", "lora_merge_", "multi_lora_linear",
           "decode_linear"]
