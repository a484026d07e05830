"""DMoE (Decoupled Mixture-of-Experts for parametric knowledge injection; CONTRACT §6).

A frozen base LM, a bank of per-document LoRA experts on its last MLP (:class:`ExpertBank`: SQLite +
tantivy BM25 + safetensors), batched expert training (:func:`train_experts`), and generation that
triggers on token uncertainty and re-predicts with the routed experts without touching the KV cache
(:class:`DMoE`). ``doe-ext dmoe build|ask|add|rm|ls`` is the command line.
"""
from doe_ext.dmoe.augment import Augmentation, augment_documents, parse_qa, qa_prompt
from doe_ext.dmoe.bank import BankError, ExpertBank
from doe_ext.dmoe.base import BaseLM, load_base
from doe_ext.dmoe.build import Document, build_bank, read_documents
from doe_ext.dmoe.experts import ExpertSet, LoRAConfig, Routing, use_experts
from doe_ext.dmoe.model import DMoE, Generation, Trigger, merged_state, token_entropy
from doe_ext.dmoe.train import TrainConfig, TrainedExpert, train_experts

__all__ = ["Augmentation", "BankError", "BaseLM", "DMoE", "Document", "ExpertBank", "ExpertSet", "Generation",
           "LoRAConfig", "Routing", "TrainConfig", "TrainedExpert", "Trigger", "augment_documents", "build_bank",
           "load_base", "merged_state", "parse_qa", "qa_prompt", "read_documents", "token_entropy",
           "train_experts", "use_experts"]
