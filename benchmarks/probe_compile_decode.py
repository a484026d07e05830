"""Does ``torch.compile`` pay for DMoE's decode step on the CPU? Times the trigger-free decoding loop
(SmolLM2-135M, float32, batch 1, a one-question QA prompt, ms per step = (33 new tokens - 1) / 32)
eager, then with each decoder layer's ``--part`` compiled (``dynamic=True``; the KV length changes
every step), and checks that the 16 greedy tokens stay equal. One process per part: compiled modules
cannot be un-compiled."""
from __future__ import annotations

import argparse
import json
import math
import time

import torch


def step_ms(dmoe, prompt: str, b: int = 1, steps: int = 32) -> float:
    dmoe.generate([prompt] * b, 1)
    t0 = time.perf_counter()
    dmoe.generate([prompt] * b, 1)
    t1 = time.perf_counter()
    dmoe.generate([prompt] * b, steps + 1)
    return 1e3 * ((time.perf_counter() - t1) - (t1 - t0)) / steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probe_compile_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["mlp", "norms", "layer"], default="mlp",
                   help="what of each decoder layer is compiled: its MLP, its two RMSNorms, or its whole forward")
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each variant (default: 3)")
    a = p.parse_args(argv)
    torch._dynamo.config.cache_size_limit = 256  # one compiled frame per layer's module
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    from doe_ext.dmoe import DMoE, load_base, qa_prompt

    base = load_base("smollm2-135m")
    dmoe = DMoE(base, None, tau=math.inf)
    dmoe.eos_tokens = set
    prompt = qa_prompt(base.tokenizer, "What is the Debian package libfoo?")
    ref = dmoe.generate([prompt], 16)[0].tokens
    eager = [step_ms(dmoe, prompt) for _ in range(a.rounds)]
    for layer in base.model.model.layers:
        if a.part == "mlp":
            layer.mlp = torch.compile(layer.mlp, dynamic=True)
        elif a.part == "norms":
            layer.input_layernorm = torch.compile(layer.input_layernorm, dynamic=True)
            layer.post_attention_layernorm = torch.compile(layer.post_attention_layernorm, dynamic=True)
        else:
            layer.forward = torch.compile(layer.forward, dynamic=True)
    t0 = time.perf_counter()
    same = dmoe.generate([prompt], 16)[0].tokens == ref
    first = time.perf_counter() - t0
    compiled = [step_ms(dmoe, prompt) for _ in range(a.rounds)]
    out = {"part": a.part, "eager_ms": [round(x, 2) for x in eager], "compiled_ms": [round(x, 2) for x in compiled],
           "first_compiled_call_s": round(first, 1), "tokens_equal": same, "torch": torch.__version__}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
