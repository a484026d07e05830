"""Models assembled from doe_ext.nn. ``import doe_ext.models`` registers model_type "doe" with
transformers' AutoConfig / AutoModel / AutoModelForCausalLM."""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from doe_ext.models.configuration_doe import DoEConfig
from doe_ext.models.modeling_doe import DoECausalLMOutput, DoEForCausalLM, DoEModel

AutoConfig.register("doe", DoEConfig, exist_ok=True)
AutoModel.register(DoEConfig, DoEModel, exist_ok=True)
AutoModelForCausalLM.register(DoEConfig, DoEForCausalLM, exist_ok=True)

__all__ = ["DoEConfig", "DoEModel", "DoEForCausalLM", "DoECausalLMOutput"]
