"""Import time (issue 12, part 6): each command in a fresh interpreter, timed round-robin so that drift
hits every variant alike; the ratios are each command's time above ``import torch`` (the floor: the
package loads its compiled ops, which need torch). Stage 1 and the CLI must not pay for transformers,
and the ``doe-ext`` script answers ``--help`` and refuses a bad argument without torch (target: < 1 s).

    python benchmarks/run.py --only import
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "import doe_ext": [sys.executable, "-c", "import doe_ext"],
    "import doe_ext.lda": [sys.executable, "-c", "import doe_ext.lda"],
    # the `doe-ext` script's entry point (doe_ext_cli): parsing imports neither torch nor transformers
    "doe-ext --help": [sys.executable, "-c", "import doe_ext_cli; doe_ext_cli.main(['--help'])"],
    "doe-ext dmoe build --help": [sys.executable, "-c", "import doe_ext_cli; doe_ext_cli.main(['dmoe', 'build', '--help'])"],
    "doe-ext dmoe ask --tau -1 (refused)": [sys.executable, "-c", "import doe_ext_cli; doe_ext_cli.main(['dmoe', "
                                            "'ask', '.', 'q', '--tau', '-1'])"],
    "AutoConfig.for_model('doe')": [sys.executable, "-c", "import doe_ext; from transformers import AutoConfig; "
                                                          "AutoConfig.for_model('doe')"],
    "import doe_ext.models (transformers)": [sys.executable, "-c", "import doe_ext.models.modeling_doe"],
}


def run(device: str, rounds: int = 7) -> list[dict]:
    if device != "cpu":
        return []
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(rounds + 1):  # the first round warms the file cache and is dropped
        for name, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode != (2 if "refused" in name else 0):
                raise RuntimeError(f"{name}: exit {done.returncode}\n{done.stderr}")
            times[name].append(time.perf_counter() - t0)
    ms = {k: 1e3 * statistics.median(v[1:]) for k, v in times.items()}
    floor = ms["import torch"]
    return [{"bench": "import", "shape": f"{name} (fresh process, median of {rounds})", "dtype": "-", "device": "cpu",
             "ms": {"wall": round(t, 1)}, "speedup": {"ms above torch": round(t - floor, 1)}}
            for name, t in ms.items()]
