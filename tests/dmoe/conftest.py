"""Tiny random base models (Llama, GPT-2) with a small BPE tokenizer, saved as Hugging Face model
directories (the helpers: dmoe_testing.py)."""
import pytest

from dmoe_testing import tiny_model, tokenizer
from doe_ext.dmoe import load_base


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def base_dir(request, tmp_path_factory):
    """A saved tiny random model directory (what ``load_base`` reads)."""
    d = tmp_path_factory.mktemp(f"base-{request.param}")
    tiny_model(request.param).save_pretrained(d)
    tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base-llama-only")
    tiny_model("llama").save_pretrained(d)
    tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def base(base_dir):
    return load_base(base_dir)


@pytest.fixture(scope="session")
def sliding_base():
    """A tiny Gemma 3, whose sliding-window layers keep only their window's states."""
    return load_base(tiny_model("gemma3"), tokenizer=tokenizer())
