"""Hugging Face drop-in: ``doeify(model)`` adds DoE's knowledge path to a pretrained causal LM."""
from doe_ext.integrations.hf.adapters import ADAPTERS, FamilyAdapter, FusedQKV, adapter_for, derive_adapter
from doe_ext.integrations.hf.doeify import DoEifyConfig, DoEWrapper, doeify
from doe_ext.integrations.hf.modules import DoEEmbedding, DoEMLP

__all__ = ["ADAPTERS", "FamilyAdapter", "FusedQKV", "adapter_for", "derive_adapter", "DoEEmbedding", "DoEifyConfig", "DoEMLP",
           "DoEWrapper", "doeify"]
