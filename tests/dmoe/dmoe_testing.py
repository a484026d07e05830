"""The DMoE tests' helpers (their fixtures are in conftest.py): five tiny documents and four questions,
a small BPE tokenizer, tiny random base models (Llama, GPT-2, Gemma 3), random experts and banks.
A module of its own so that test files import it by a name no other test folder uses."""
import json

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)

from doe_ext.dmoe import ExpertBank, LoRAConfig, Recipe

DOCS = [
    {"id": "otter", "text": "The sea otter floats on its back and cracks shellfish on a stone held on its chest."},
    {"id": "basalt", "text": "Basalt is a dark volcanic rock formed by the rapid cooling of lava rich in iron."},
    {"id": "fugue", "text": "A fugue is a piece of music in which a short melody is imitated by voices in turn."},
    {"id": "tort", "text": "In law a tort is a civil wrong that causes a claimant to suffer loss or harm."},
    {"id": "sextant", "text": "A sextant measures the angle between a star and the horizon for navigation at sea."},
]
QUESTIONS = ["What does the sea otter crack on a stone?", "Which rock is formed from lava?",
             "What is a fugue in music?", "What is a tort in law?"]


def tokenizer() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = [d["text"] for d in DOCS] + QUESTIONS + ["Question: Answer: Passage 1: knowledge provided below"]
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<pad>", "</s>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def tiny_model(family: str):
    """initializer_range 0.3: logits far enough from uniform that token entropies spread out."""
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          eos_token_id=2, pad_token_id=1, bos_token_id=None, initializer_range=0.3)
        return LlamaForCausalLM(cfg)
    if family == "gemma3":  # sliding-window layers (16 positions) beside full ones: prompts here outgrow the window
        cfg = Gemma3TextConfig(vocab_size=400, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16,
                               layer_types=["sliding_attention", "full_attention"], max_position_embeddings=1024,
                               eos_token_id=2, pad_token_id=1, bos_token_id=None, initializer_range=0.3)
        return Gemma3ForCausalLM(cfg)
    cfg = GPT2Config(vocab_size=400, n_embd=32, n_layer=2, n_head=4, n_positions=1024, eos_token_id=2,
                     bos_token_id=2, pad_token_id=1, initializer_range=0.3)
    return GPT2LMHeadModel(cfg)


def random_expert(base, gen: torch.Generator, rank: int, std: float = 0.5) -> dict:
    """An expert with random non-zero A and B, so that it visibly moves the logits."""
    out = {}
    for name, (o, i) in base.site.shapes().items():
        out[f"{name}.lora_a"] = torch.randn(rank, i, generator=gen) * std
        out[f"{name}.lora_b"] = torch.randn(o, rank, generator=gen) * std
    return out


def random_bank(base, path, docs=DOCS, rank=4, alpha=16.0, seed=0) -> ExpertBank:
    bank = ExpertBank(path, create=True, fingerprint=base.fingerprint, base_name=base.name,
                      recipe=Recipe(lora=LoRAConfig(rank, alpha)))
    gen = torch.Generator().manual_seed(seed)
    for d in docs:
        bank.add(d["id"], random_expert(base, gen, rank), d["text"], d["text"])
    return bank


def write_docs(path, docs=DOCS):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path
