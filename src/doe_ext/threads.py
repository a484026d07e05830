"""One thread policy for the process: torch's intra-op pool, which doe_ext's C++ kernels share
(they run through ``torch::stable::parallel_for``; ``_C`` links no OpenMP runtime of its own, see
:func:`openmp_runtimes`).

Why it matters: with as many threads as cores, every parallel region waits at its barrier for its
slowest thread, and a thread that shares its core with another busy process is the slowest by a
whole time slice. On 2 cores beside one ``while True: pass``, a three-document ``doe-ext dmoe build``
took 2.5x its idle time with two threads (and a build beside another build 7-8x); one thread is
what the free core can run. So the commands that train or generate (``doe-ext dmoe build | add | ask
| eval | reader train``) use :func:`configure`: ``--threads N``, else ``$DOE_EXT_NUM_THREADS``, else
the cores that are free when the command starts (:func:`free_cores`). In Python, call
:func:`configure` yourself (importing doe_ext changes no setting of torch's).
"""
from __future__ import annotations

import os
import time

ENV = "DOE_EXT_NUM_THREADS"
_OPENMP = ("libgomp", "libiomp", "libomp")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat (None off Linux)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    total = sum(v[:8])  # guest time is already counted in user
    return total - idle, total


def free_cores(sample_s: float = 0.2) -> int:
    """The usable cores minus those other processes keep busy, measured over ``sample_s`` seconds
    (this process sleeps meanwhile); at least 1. Without /proc/stat: all usable cores."""
    cores = usable_cores()
    a = _cpu_times()
    if a is None:
        return cores
    time.sleep(sample_s)
    b = _cpu_times()
    if b is None or b[1] <= a[1]:
        return cores
    busy = (b[0] - a[0]) / (b[1] - a[1]) * (os.cpu_count() or cores)
    return max(1, min(cores, cores - round(busy)))


def configure(threads: int | None = None) -> int:
    """Set torch's intra-op threads: ``threads``, else ``$DOE_EXT_NUM_THREADS``, else
    :func:`free_cores`. Returns the number set."""
    if threads is None and os.environ.get(ENV, "").strip():
        text = os.environ[ENV].strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"${ENV} must be a positive integer, got {text!r}")
        threads = int(text)
    if threads is None:
        threads = free_cores()
    elif not (isinstance(threads, int) and threads >= 1):
        raise ValueError(f"threads: `threads` must be a positive int, got {threads!r}")
    import torch

    torch.set_num_threads(threads)
    return threads


def openmp_runtimes() -> list[str]:
    """The OpenMP runtimes loaded in this process (file names, from /proc/self/maps; [] off Linux).
    One is expected: torch's. Two (e.g. libgomp and libiomp5) means two pools spinning at once."""
    try:
        with open("/proc/self/maps") as f:
            names = {os.path.basename(line.split()[-1]) for line in f if "/" in line}
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(_OPENMP) and ".so" in n)
