"""The shipped self-test (``python -m doe_ext.selftest``): it passes on this install, it fails (exit 1,
a FAIL row) when an op disagrees with its twin or accepts a bad input, and its command line works."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from doe_ext import reference, selftest
from doe_ext.ops import specs
from doe_ext.ops.specs import PUBLIC_OPS, RAW_OPS


def test_passes_on_the_cpu_and_covers_every_op(monkeypatch, capsys):
    rows, real_run = [], selftest.run
    monkeypatch.setattr(selftest, "run", lambda *a, **k: rows.extend(real_run(*a, **k)) or rows)
    assert selftest.main(["--dtype", "float32", "--dtype", "float64"]) == 0
    done = {(r["op"], r["check"], r["dtype"]) for r in rows if r["ok"]}
    want = {(op, "values + gradients", dt) for op in PUBLIC_OPS for dt in ("float32", "float64")}
    want |= {(op, "gradcheck (cpu)", "float64") for op in PUBLIC_OPS}
    want |= {(op, check, dt) for op in RAW_OPS for check in ("opcheck", "bad inputs") for dt in ("float32", "float64")}
    assert want <= done, sorted(want - done)
    out = capsys.readouterr().out
    assert f"{len(rows)} of {len(rows)} checks passed" in out and "FAIL" not in out, out


def test_on_cuda_it_checks_every_op_but_the_cpu_only_ones():
    listed = {(op, check) for op, check, _ in selftest.checks("cuda:0", torch.float32)}  # listed, not run
    raw = {op for op, check in listed if check == "opcheck"}
    assert raw == set(RAW_OPS) - set(specs.CPU_ONLY_OPS) and specs.CPU_ONLY_OPS
    assert {op for op, _, _ in selftest.checks("cpu", torch.float32)} >= set(RAW_OPS)


def test_a_wrong_twin_is_a_failed_row_and_exit_1(monkeypatch, capsys):
    monkeypatch.setattr(reference, "lora_merge_ref", lambda weight, lora_a, lora_b, scales: weight + 1.0)
    assert selftest.main(["--dtype", "float32"]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if " FAIL " in line]
    assert failed and all(line.startswith("lora_merge") for line in failed), out
    assert "FAILED" in out.splitlines()[-1]


def test_an_accepted_bad_input_is_a_failed_row(monkeypatch):
    real = specs.bad_inputs
    # a "bad input" that is in fact valid: the op accepts it, which the check must report
    monkeypatch.setattr(specs, "bad_inputs", lambda op, device, dtype: [
        ("valid call", lambda: torch.ops.doe_ext.lora_merge(torch.ones(2, 3), torch.ones(1, 1, 3), torch.ones(1, 2, 1),
                                                            torch.ones(1)), "weight")] if op == "lora_merge" else
        real(op, device, dtype))
    rows = selftest.run("cpu", (torch.float32,), stream=io.StringIO())
    bad = [r for r in rows if not r["ok"]]
    assert [(r["op"], r["check"]) for r in bad] == [("lora_merge", "bad inputs")], bad
    assert "accepted" in bad[0]["detail"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees a CUDA device")
def test_cuda_without_a_device_names_the_option(capsys):
    with pytest.raises(SystemExit) as e:
        selftest.main(["--device", "cuda"])
    assert e.value.code == 2 and "--device cuda" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_passes_on_cuda():
    assert selftest.main(["--device", "cuda", "--dtype", "float32", "--dtype", "bfloat16", "--dtype", "float16"]) == 0


def test_help_runs():
    r = subprocess.run([sys.executable, "-m", "doe_ext.selftest", "--help"], capture_output=True, text=True, check=True)
    assert "--device" in r.stdout and "--dtype" in r.stdout
