"""The benchmark commands benchmarks/README.md shows for the DMoE decoding work answer `--help` and
name their options (the runs themselves take minutes to hours: `make bench` and the README's raw logs)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("module, options", [
    ("benchmarks.bench_dmoe", ["--decode-floor", "--prefill-peak", "--best-batch", "--gemv"]),
    ("benchmarks.check_streaming_predictions", ["--tables"]),
    ("benchmarks.probe_compile_decode", ["--part", "--rounds"]),
])
def test_help_runs_and_names_the_options(module, options):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    for option in options:
        assert option in out.stdout, (option, out.stdout)
