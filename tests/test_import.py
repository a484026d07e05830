"""The package imports lazily (issue 12, part 6): Stage 1 and the CLI never import transformers, and
model type "doe" is still registered with transformers' Auto classes whichever is imported first.
Each case runs in a fresh interpreter; the times are a benchmark row (benchmarks/bench_import.py)."""
import subprocess
import sys

import pytest


def fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("code", [
    "import doe_ext",
    "import doe_ext.lda",
    "from doe_ext.cli import main\ntry:\n    main(['lda', '--help'])\nexcept SystemExit:\n    pass",
    "from doe_ext.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
])
def test_stage1_and_cli_do_not_import_transformers(code):
    assert fresh(code + "\nimport sys\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))") \
        .splitlines()[-1] == "[]"


TINY = ("dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, "
        "intermediate_size=32)")


@pytest.mark.parametrize("first", [
    "import doe_ext\nfrom transformers import AutoConfig, AutoModel, AutoModelForCausalLM",
    "import doe_ext\nfrom transformers import AutoModelForCausalLM, AutoModel, AutoConfig",
    "from transformers import AutoConfig\nimport doe_ext\nfrom transformers import AutoModel, AutoModelForCausalLM",
    "from transformers import AutoModelForCausalLM, AutoModel, AutoConfig\nimport doe_ext",
    "import doe_ext\nfrom doe_ext.models import DoEForCausalLM\nfrom transformers import AutoConfig, AutoModel, "
    "AutoModelForCausalLM",
    # a model's own module first: it imports modeling_auto half-way through its own import
    "import doe_ext\nfrom transformers import LlamaForCausalLM\nfrom transformers import AutoConfig, AutoModel, "
    "AutoModelForCausalLM",
    "import doe_ext\nfrom transformers import Gemma3ForCausalLM\nfrom transformers import AutoConfig, AutoModel, "
    "AutoModelForCausalLM",
], ids=["doe_ext-first", "doe_ext-first-models", "config-first", "transformers-first", "models-first",
        "llama-model-first", "gemma3-model-first"])
def test_auto_classes_know_doe_whatever_the_import_order(first):
    got = fresh(first + f"\ncfg = AutoConfig.for_model('doe', **{TINY})\n"
                "print(type(cfg).__name__, type(AutoModel.from_config(cfg)).__name__, "
                "type(AutoModelForCausalLM.from_config(cfg)).__name__)")
    assert got.splitlines()[-1] == "DoEConfig DoEModel DoEForCausalLM"


def test_submodules_load_on_first_use():
    import doe_ext

    assert doe_ext.models.DoEForCausalLM.__name__ == "DoEForCausalLM" and "nn" in dir(doe_ext)
    assert doe_ext.nn.KnowledgeAttention.__module__.startswith("doe_ext.nn")
    with pytest.raises(AttributeError, match="module 'doe_ext' has no attribute 'modles'"):
        doe_ext.modles
    with pytest.raises(AttributeError, match="module 'doe_ext.models' has no attribute 'DoEConfigs'"):
        doe_ext.models.DoEConfigs
