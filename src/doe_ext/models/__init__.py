"""Models assembled from doe_ext.nn. Model type "doe" is registered with transformers' AutoConfig /
AutoModel / AutoModelForCausalLM as soon as both sides are imported (``doe_ext._auto``); the classes
here are imported on first use."""
import importlib

_WHERE = {"DoEConfig": "configuration_doe", "DoEDropInConfig": "configuration_doe", "DoEModel": "modeling_doe",
          "DoEForCausalLM": "modeling_doe",
          "DoECausalLMOutput": "modeling_doe"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"doe_ext.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'doe_ext.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
