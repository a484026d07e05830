"""The benchmark commands benchmarks/results/history.md shows for the DMoE decoding work answer `--help` and
name their options (the runs themselves take minutes to hours: `make bench` and the README's raw logs)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("module, options", [
    ("benchmarks.bench_dmoe", ["--decode-floor", "--prefill-peak", "--best-batch", "--gemv"]),
    ("benchmarks.check_streaming_predictions", ["--tables"]),
    ("benchmarks.probe_compile_decode", ["--part", "--rounds"]),
    ("benchmarks.ab_streaming_scope", ["--rounds", "--steps"]),
])
def test_help_runs_and_names_the_options(module, options):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    for option in options:
        assert option in out.stdout, (option, out.stdout)


def test_read_bandwidth_reads_both_ways_and_names_a_bad_way():
    """The decode benchmark's floor reads the bandwidth through ATen's sum and through decode_linear."""
    import math

    from benchmarks.bench_dmoe import read_bandwidth

    x = torch.ones(2**20)  # 4 MiB: the call, not the machine's rate
    for how in ("sum", "gemv"):
        bw = read_bandwidth(x=x, reps=2, how=how)
        assert math.isfinite(bw) and bw > 0, (how, bw)
    with pytest.raises(ValueError, match=r"^read_bandwidth: `how` must be 'sum' or 'gemv', got 'mean'$"):
        read_bandwidth(x=x, how="mean")


def test_every_benchmark_has_its_current_figure():
    """benchmarks/README.md keeps the current figure of each benchmark with the command that measures it:
    a new bench_*.py without a row there fails here; so does a link to a results file that is not there."""
    import re

    readme = (ROOT / "benchmarks" / "README.md").read_text()
    for path in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        name = path.stem[len("bench_"):]
        assert any(c in readme for c in (f"--only {name}`", f"{path.name}`", f"benchmarks.{path.stem} ")), name
    for raw in re.findall(r"`([\w.*-]+\.(?:json|log|txt|md))`", readme):
        assert list((ROOT / "benchmarks" / "results").glob(raw)), raw
