"""The base model side of DMoE: every family of the table, loading, fingerprints, the structural check."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from dmoe_testing import QUESTIONS, random_bank, tokenizer
from doe_ext.dmoe import DMoE, load_base
from doe_ext.dmoe.experts import FAMILIES, ExpertSite

SMALL = dict(vocab_size=400, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2, pad_token_id=1, initializer_range=0.3)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL, bos_token_id=None),
    "qwen2": lambda: Qwen2Config(**SMALL),
    "mistral": lambda: MistralConfig(**SMALL),
    # Gemma 3: sandwich norms around the MLP (the site applies the post-MLP one), a tied head
    "gemma3_text": lambda: Gemma3TextConfig(**SMALL, head_dim=8, bos_token_id=None, sliding_window=16),
    "gpt2": lambda: GPT2Config(vocab_size=400, n_embd=32, n_layer=2, n_head=4, n_positions=512, eos_token_id=2,
                               pad_token_id=1, initializer_range=0.3),
}


def test_every_family_of_the_table_is_tested():
    assert set(CONFIGS) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_family(family, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[family]())
    base = load_base(model, tokenizer=tokenizer())
    ids = torch.randint(3, 400, (2, 9))
    with torch.no_grad(), base.site.capture() as cap:
        want = base.model(input_ids=ids).logits
    torch.testing.assert_close(base.site.logits(cap.value), want, rtol=1e-5, atol=1e-5)
    bank = random_bank(base, tmp_path / "bank")
    dmoe = DMoE(base, bank, tau=math.inf)
    enc = base.tokenizer(QUESTIONS[0], return_tensors="pt", add_special_tokens=False)
    ref = base.model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert dmoe.generate(QUESTIONS[0], max_new_tokens=6)[0].tokens == ref[0, enc["input_ids"].shape[1]:].tolist()
    assert DMoE(base, bank, tau=0.0).generate(QUESTIONS[0], max_new_tokens=3)[0].triggers


def test_unsupported_family_and_structure():
    from transformers import GPTNeoXConfig

    neox = AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=400, hidden_size=32, intermediate_size=48,
                                                          num_hidden_layers=2, num_attention_heads=4))
    with pytest.raises(ValueError, match="model_type 'gpt_neox' is not supported"):
        load_base(neox, tokenizer=tokenizer())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    last = ExpertSite(model)
    last.verify()
    # A last layer that does something after its MLP block breaks the assumption.
    model.model.layers[-1].register_forward_hook(lambda module, args, out: out + 1.0)  # (a scale would not show: RMSNorm follows)
    with pytest.raises(ValueError, match="does not end with out = r \\+ mlp\\(mlp_norm\\(r\\)\\)"):
        last.verify()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is neither a built-in name"):
        load_base(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        load_base(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="needs `tokenizer`"):
        load_base(AutoModelForCausalLM.from_config(CONFIGS["llama"]()))


def test_fingerprint_follows_every_weight(base_dir):
    from doe_ext.dmoe.base import fingerprint

    a, b = load_base(base_dir), load_base(base_dir)
    assert a.fingerprint == b.fingerprint == fingerprint(b.model)
    with torch.no_grad():
        next(b.model.parameters()).add_(1e-4)  # the embedding: every expert's input depends on it
    assert fingerprint(b.model) != a.fingerprint


def test_site_depth_and_keys(base_dir):
    base = load_base(base_dir)
    last, both = base.site, ExpertSite(base.model, depth=1.0)
    assert last.keeps_cache and last.layer_ids == (1,) and last.stale_layer_share == 0.0
    assert not both.keeps_cache and both.layer_ids == (0, 1) and both.stale_layer_share == 1.0
    assert both.names == tuple(f"{i}.{p}" for i in (0, 1) for p in last.names)
    assert ExpertSite(base.model, depth=0.5).names == last.names  # one layer of two: the last
    assert {n.split(".", 1)[1]: s for n, s in both.shapes().items() if n.startswith("1.")} == last.shapes()
    before = dict(base.model.named_modules())
    last.attach(), both.attach(), last.attach()  # idempotent; the two sites' wrappers chain
    both.detach()
    assert all(type(m).__name__ == "ExpertLinear" and m.name in last.names for m in last.modules().values())
    last.detach()
    assert dict(base.model.named_modules()).keys() == before.keys()
    for bad in (0, 3, 1.5, 0.0, True, "last"):
        with pytest.raises(ValueError, match="`depth` must be an int in \\[1, 2\\] or a fraction"):
            ExpertSite(base.model, depth=bad)
