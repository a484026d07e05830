"""The process's thread policy (doe_ext.threads): what --threads, $DOE_EXT_NUM_THREADS and the free
cores set, and one OpenMP runtime in the process. How builds behave beside a busy process is a
benchmark (benchmarks/bench_threads.py), not a timed test."""
import os
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


@pytest.fixture
def claims(tmp_path, monkeypatch):
    """A claims folder of this test's own (the commands' claims live under $XDG_RUNTIME_DIR)."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv(threads.ENV, raising=False)
    return threads.claims_dir()


def test_configure_sets_torchs_threads(restore_threads, claims, monkeypatch):
    monkeypatch.setenv(threads.ENV, "1")
    assert threads.configure(3) == 3 and torch.get_num_threads() == 3  # the argument wins
    assert threads.configure() == 1 and torch.get_num_threads() == 1  # then the environment
    monkeypatch.delenv(threads.ENV)
    monkeypatch.setattr(threads, "free_cores", lambda: 5)  # then the free cores (measured: the test below)
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
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


def test_cores_claimed_by_a_running_command_are_left_to_it(restore_threads, claims, monkeypatch):
    """A core another running command claimed is not free, even while that command is still loading
    (idle to /proc/stat); a claim whose process has ended counts for nothing."""
    monkeypatch.setattr(threads, "free_cores", lambda: 4)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    claims.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    try:
        (claims / str(alive.pid)).write_text("3")
        (claims / str(ended.pid)).write_text("2")
        assert threads.claimed_cores() == 3
        assert threads.configure() == 1  # 4 usable, 3 claimed by the live one
        (claims / str(alive.pid)).write_text("1")
        assert threads.configure() == 3
        (claims / str(alive.pid)).write_text("6")
        assert threads.configure() == 1  # at least one
    finally:
        alive.communicate(b"")


def test_a_command_claims_its_threads_while_it_runs(restore_threads, claims, tmp_path, capsys):
    from doe_ext.cli import main

    mine = claims / str(os.getpid())
    assert threads.configure(2, claim=True) == 2 and mine.read_text() == "2"
    threads.release()
    assert not mine.exists()
    assert main(["dmoe", "ask", str(tmp_path), "q", "--threads", "1"]) == 2  # configured, then no bank
    assert "no bank here" in capsys.readouterr().err and not mine.exists()  # released when it ended


def test_two_commands_started_together_split_the_cores(claims):
    """Started in the same instant, each would measure the other idle and take every core: they take
    turns instead, and the second leaves the first what it claimed."""
    env = {**os.environ, "XDG_RUNTIME_DIR": str(claims.parent)}
    env.pop(threads.ENV, None)
    code = "import sys; from doe_ext import threads; print(threads.configure(claim=True), flush=True); sys.stdin.read()"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=env, text=True) for _ in range(2)]
    try:
        got = [int(p.stdout.readline()) for p in procs]
    finally:
        for p in procs:
            p.communicate("")
    cores = threads.usable_cores()
    assert all(g >= 1 for g in got) and (sum(got) <= cores or min(got) == 1), got
    assert not list(claims.glob("[0-9]*"))  # both released at exit


def test_a_command_gives_cores_back_to_one_started_beside_it(restore_threads, claims, monkeypatch):
    """What the policy chose shrinks to leave a later command its claim, and grows back (never above
    the first choice) when that one ends; threads a user chose are left alone."""
    monkeypatch.setattr(threads, "free_cores", lambda: 3)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    mine = claims / str(os.getpid())
    assert threads.configure(claim=True) == 3
    for user_chose in (False, True):
        if user_chose:
            assert threads.configure(4, claim=True) == 4
        other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        try:
            (claims / str(other.pid)).write_text("2")
            want = 4 if user_chose else 2
            assert threads.rebalance(every_s=0) == want and torch.get_num_threads() == want
            assert mine.read_text() == str(want)
        finally:
            other.communicate(b"")
        want = 4 if user_chose else 3
        assert threads.rebalance(every_s=0) == want and torch.get_num_threads() == want
        assert mine.read_text() == str(want)
    threads.release()
