"""The process's thread policy (doe_ext.threads): what --threads, $DOE_EXT_NUM_THREADS and the free
cores set, and one OpenMP runtime in the process. How builds behave beside a busy process is a
benchmark (benchmarks/bench_threads.py), not a timed test."""
import subprocess
import sys

import pytest
import torch

import doe_ext
from doe_ext import threads


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_configure_sets_torchs_threads(restore_threads, monkeypatch):
    monkeypatch.setenv(threads.ENV, "1")
    assert threads.configure(3) == 3 and torch.get_num_threads() == 3  # the argument wins
    assert threads.configure() == 1 and torch.get_num_threads() == 1  # then the environment
    monkeypatch.delenv(threads.ENV)
    monkeypatch.setattr(threads, "free_cores", lambda: 5)  # then the free cores (measured: the test below)
    assert threads.configure() == 5 and torch.get_num_threads() == 5


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_environment_value_is_named(restore_threads, monkeypatch, value):
    monkeypatch.setenv(threads.ENV, value)
    with pytest.raises(ValueError, match=rf"\$DOE_EXT_NUM_THREADS must be a positive integer, got '{value}'"):
        threads.configure()


def test_a_bad_argument_is_named(restore_threads):
    with pytest.raises(ValueError, match="threads: `threads` must be a positive int, got 0"):
        threads.configure(0)


def test_free_cores_sees_a_busy_process():
    """A process spinning on one core leaves one core fewer free (here: 2 cores, so 1); alone, all."""
    cores = threads.usable_cores()
    if cores < 2:
        pytest.skip("needs 2 cores")
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = min(threads.free_cores(0.5) for _ in range(2))
    finally:
        spin.kill()
        spin.wait()
    assert busy <= cores - 1


def test_one_openmp_runtime_and_build_info_reports_it():
    info = doe_ext.build_info()
    assert info["openmp"] == threads.openmp_runtimes() and len(info["openmp"]) == 1, info["openmp"]
    assert info["threads"] == torch.get_num_threads()


def test_the_cli_sets_threads(restore_threads, tmp_path, capsys):
    """--threads is checked while parsing, and set when a command that computes starts (here `ask` on a
    folder with no bank: threads set, then the bank refused)."""
    from doe_ext.cli import main

    with pytest.raises(SystemExit):
        main(["dmoe", "ask", str(tmp_path), "q", "--threads", "0"])
    assert "argument --threads: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["dmoe", "ask", str(tmp_path), "q", "--threads", "1"]) == 2  # no bank here: after configure
    assert torch.get_num_threads() == 1 and "no bank here" in capsys.readouterr().err
