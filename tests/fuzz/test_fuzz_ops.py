"""Fuzz every public op and raw backward op (issue 14): hypothesis draws (mutation, seed, sizes),
a forked worker builds and runs the case (``cases.py``, ``worker.py``). Every case must end "ok":
a valid input equals the reference twin (NaN and Inf included), an invalid one raises an error that
names the argument; a crash, a hang, a memory blow-up or a silent result fails with the inputs.
``DOE_EXT_FUZZ_EXAMPLES`` sets the cases per op (300 in make test; ``make fuzz``: 5000)."""
from __future__ import annotations

import os

import pytest
from cases import MUTATIONS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from worker import Worker

EXAMPLES = int(os.environ.get("DOE_EXT_FUZZ_EXAMPLES", "300"))
SIZES = st.fixed_dictionaries({k: st.integers(0, 4) for k in "abcdef"})


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.mark.parametrize("op", list(MUTATIONS))
def test_fuzz(op, worker):
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(mutation=st.sampled_from(MUTATIONS[op]), seed=st.integers(0, 2**31 - 1), sizes=SIZES)
    def case(mutation, seed, sizes):
        res = worker.run((op, mutation, seed, sizes))
        assert res["status"] == "ok", f"{op} / {mutation}, seed={seed}, sizes={sizes}: {res}"

    case()


def test_the_worker_reports_a_crash_and_recovers():
    """The harness itself: a segfaulting case is reported as a crash, and the next case runs."""
    import cases

    cases.BUILDERS["_segfault"] = lambda m, seed, s: (lambda: __import__("ctypes").string_at(0), None, None)
    w = Worker()  # forked after the test-only builder exists
    try:
        res = w.run(("_segfault", "none", 0, {}))
        assert res["status"] == "crash" and "exit code -11" in res["message"], res
        assert w.run(("lora_merge", "none", 1, dict(a=1, b=2, c=1, d=0, e=0, f=0))) == {"status": "ok"}
    finally:
        del cases.BUILDERS["_segfault"]
        w.close()
