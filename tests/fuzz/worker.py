"""A forked worker that runs fuzz cases, so that a crash (a segfault, an abort) or a memory blow-up
of an op is a reported failure with its inputs, not a dead test run. The worker caps its address
space (4 GiB above what it maps at start), runs one thread (a forked OpenMP pool is not safe), and
is restarted after a crash."""
from __future__ import annotations

import multiprocessing as mp
import re
import resource
import traceback

ALLOWED = (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError)


def _flatten(x):
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _flatten(item)]
    return [x] if hasattr(x, "shape") else []


def _tolerance(a, b) -> dict:
    """float64: exact up to rounding; float32: 1e-4; float16 / bfloat16 (the op in float32 math, the
    twin in the half type): a few of the dtype's ulps, relative to the output's scale."""
    import torch

    if a.dtype == torch.float64:
        return {}
    if a.dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-5)
    finite = b[torch.isfinite(b)].abs()
    scale = max(1.0, finite.max().item()) if finite.numel() else 1.0
    tol = 4 * torch.finfo(a.dtype).eps
    return dict(rtol=tol, atol=tol * scale)


def run_case(op: str, mutation: str, seed: int, sizes: dict) -> dict:
    """``{"status": "ok"}`` or what went wrong: ``raised_on_valid``, ``silent`` (an invalid input
    gave a result), ``unnamed`` (the message does not name the argument), ``wrong_exception`` (e.g.
    MemoryError), ``mismatch`` (a valid input, a result unlike the reference twin's)."""
    import torch
    from cases import build

    call, reference, name = build(op, mutation, seed, sizes)
    try:
        got = call()
    except Exception as e:  # noqa: BLE001 - classifying is the point
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if name is None:
            return {"status": "raised_on_valid", "message": msg}
        if isinstance(e, MemoryError) or not isinstance(e, ALLOWED):
            return {"status": "wrong_exception", "message": msg}
        if not re.search(rf"[`']{re.escape(name)}[`']", str(e)):
            return {"status": "unnamed", "message": f"expected `{name}` in: {msg}"}
        return {"status": "ok"}
    if name is not None:
        return {"status": "silent", "message": f"no error for an invalid `{name}`"}
    want = reference()
    got_t, want_t = _flatten(got), _flatten(want)[:len(_flatten(got))]
    try:
        for a, b in zip(got_t, want_t):
            if a.is_floating_point():
                torch.testing.assert_close(a, b, equal_nan=True, **_tolerance(a, b))
            else:
                assert torch.equal(a, b)
    except AssertionError as e:
        return {"status": "mismatch", "message": str(e).splitlines()[0]}
    return {"status": "ok"}


def _serve(conn) -> None:
    import torch

    torch.set_num_threads(1)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (4 << 30), resource.RLIM_INFINITY))
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            res = run_case(*job)
        except BaseException:  # noqa: BLE001 - a harness error is reported, not raised
            res = {"status": "harness_error", "message": traceback.format_exc()}
        conn.send(res)


class Worker:
    def __init__(self, timeout: float = 120.0):
        self.timeout = timeout
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()  # the parent's copy: the worker's death is then an EOF here

    def run(self, job: tuple) -> dict:
        self.conn.send(job)
        if not self.conn.poll(self.timeout):
            self.proc.kill()
            self.proc.join()
            self._start()
            return {"status": "hang", "message": f"no answer in {self.timeout} s"}
        try:
            return self.conn.recv()
        except EOFError:
            self.proc.join()
            code = self.proc.exitcode
            self._start()
            return {"status": "crash", "message": f"the worker died (exit code {code}, a negative code is a signal)"}

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
