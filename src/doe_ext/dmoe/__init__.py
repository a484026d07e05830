"""DMoE (Decoupled Mixture-of-Experts for parametric knowledge injection; docs/design.md#dmoe).

A frozen base LM, a bank of per-document LoRA experts on its last MLP (:class:`ExpertBank`: SQLite +
tantivy BM25 + safetensors, one :class:`Recipe` per bank), batched expert training with the paper's
next-token objective or context distillation (:func:`train_experts`), and generation that triggers on
token uncertainty and re-predicts with the routed experts, composed by ``sum`` / ``mean`` / ``score`` /
``top1``, without touching the KV cache (:class:`DMoE`). ``doe-ext dmoe build|ask|eval|add|rm|ls`` is
the command line.

Names are imported on first use, so that inference (``DMoE``, ``ExpertBank``) never imports the
training code (``train_experts``, ``build_bank``).
"""
import importlib

_EXPORTS = {
    "augment": ("Augmentation", "Document", "augment_documents", "parse_qa", "qa_prompt"),
    "bank": ("BankError", "ExpertBank"),
    "base": ("BaseLM", "load_base"),
    "build": ("build_bank", "read_documents"),
    "experts": ("ActiveExperts", "ExpertSet", "ExpertSite", "LoRAConfig", "use_experts"),
    "model": ("DMoE", "Generation", "Trigger", "merged_state", "token_entropy"),
    "recipe": ("RECIPES", "Recipe", "RecipeError"),
    "routing": ("COMPOSITIONS", "compose"),
    "train": ("TrainedExpert", "train_experts"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'doe_ext.dmoe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"doe_ext.dmoe.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
