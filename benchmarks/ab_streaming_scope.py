"""A/B of how streaming_linears reaches the layers (issue 47): through a scope (now) against setting each
layer's ``forward`` for the block (before), interleaved in one process so the VM's moving bandwidth
hits both alike. DMoE decoding without triggers (tau = inf, the lean loop), SmolLM2-135M, float32, a
64-expert random bank, batch 1 and 8; a step is the run with ``steps + 1`` new tokens minus the run
with 1, over ``steps``; medians over rounds and the median of each round's scope / override ratio.

    python -m benchmarks.ab_streaming_scope [--rounds 7]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.bench_dmoe import random_bank
from doe_ext.dmoe.data import debian_records, passage
from doe_ext.ops import decode_linear


@contextlib.contextmanager
def forward_override(layers):
    """The previous streaming_linears: each layer's ``forward`` set for the block."""
    layers = [m for m in layers if "forward" not in vars(m)]
    for layer in layers:
        layer.forward = functools.partial(lambda m, x: decode_linear(x, m.weight, m.bias), layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args(argv)
    from doe_ext.dmoe import DMoE, load_base, qa_prompt

    base = load_base("smollm2-135m")
    passages = [(f["Package"], passage(f)) for f in debian_records(64)]
    work = Path(tempfile.mkdtemp(prefix="ab-streaming-"))
    try:
        bank = random_bank(base, passages, work / "bank")
        prompt = qa_prompt(base.tokenizer, f"What is the Debian package {passages[0][0]}?")
        scope, override = DMoE(base, bank), DMoE(base, bank)
        override._streaming = lambda site=False: forward_override(override._site_linears if site else override._linears)
        scope.eos_tokens = override.eos_tokens = set  # each run decodes the steps asked for
        rows = []
        for b in (1, 8):
            times = {"scope": [], "override": []}
            for m in (scope, override):
                m.generate([prompt] * b, 2, tau=math.inf)  # warm
            for _ in range(args.rounds):
                for name, m in (("scope", scope), ("override", override)):
                    t0 = time.perf_counter()
                    m.generate([prompt] * b, 1, tau=math.inf)
                    t1 = time.perf_counter()
                    m.generate([prompt] * b, args.steps + 1, tau=math.inf)
                    times[name].append(1e3 * ((time.perf_counter() - t1) - (t1 - t0)) / args.steps)
            rows.append({"batch": b, "ms_per_step": {k: statistics.median(v) for k, v in times.items()},
                         "scope_over_override_paired": statistics.median(
                             s / o for s, o in zip(times["scope"], times["override"])),
                         "rounds": times})
        print(json.dumps(rows, indent=1))
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
