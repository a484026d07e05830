"""One thread policy for the process: torch's intra-op pool, which doe_ext's C++ kernels share
(they run through ``torch::stable::parallel_for``; ``_C`` links no OpenMP runtime of its own, see
:func:`openmp_runtimes`).

Why it matters: with as many threads as cores, every parallel region waits at its barrier for its
slowest thread, and a thread that shares its core with another busy process is the slowest by a
whole time slice. On 2 cores beside one ``while True: pass``, a three-document ``doe-ext dmoe build``
took 2.5x its idle time with two threads (and a build beside another build 7-8x); one thread is
what the free core can run. So the commands that train or generate (``doe-ext dmoe build | add | ask
| eval | reader train``) use :func:`configure`: ``--threads N``, else ``$DOE_EXT_NUM_THREADS``, else
the cores that are free when the command starts (:func:`free_cores`) and that no other running
command has claimed. Each command claims the threads it set (a file named by its pid, removed when it
ends; the files of dead processes are ignored), so two builds started in the same instant, which
would each measure the other idle, split the cores instead of both taking all; and a command that
started alone gives cores back to one that starts beside it (:func:`rebalance`, called at every
decoding and optimizer step) and takes them again when that one ends. In Python, call
:func:`configure` yourself (importing doe_ext changes no setting of torch's).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the claims alone
    fcntl = None

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


def claims_dir() -> Path:
    """Where running commands claim their threads: one file per process, its pid the name."""
    return Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"doe_ext-threads-{os.getuid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claimed_cores() -> int:
    """The threads that other running processes have claimed (:func:`configure` with ``claim``)."""
    total = 0
    for f in claims_dir().glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(f.name)
            if pid != os.getpid() and _alive(pid):
                total += int(f.read_text())
    return total


def _claim(threads: int) -> None:
    global _registered
    with contextlib.suppress(OSError):
        (claims_dir() / str(os.getpid())).write_text(str(threads))
    if not _registered:
        atexit.register(release)
        _registered = True


def release() -> None:
    """Drop this process's claim (the command is done; also at exit)."""
    global _chosen
    _chosen = None
    with contextlib.suppress(OSError):
        (claims_dir() / str(os.getpid())).unlink(missing_ok=True)


_chosen: int | None = None  # the cores the policy chose when this process claimed them (None: not the policy's)
_checked = 0.0
_registered = False


def rebalance(every_s: float = 1.0) -> int:
    """Fit this process's threads to the claims of the commands that started after it: at most what the
    policy chose at the start, at most the usable cores less the others' claims, at least 1; its own
    claim follows. A no-op (at most once per ``every_s`` seconds) unless :func:`configure` chose the
    threads and claimed them; DMoE's decoding and training loops call it at every step. Returns the threads."""
    global _checked
    import torch

    now = time.monotonic()
    if _chosen is None or now - _checked < every_s:
        return torch.get_num_threads()
    _checked = now
    want = max(1, min(_chosen, usable_cores() - claimed_cores()))
    if want != torch.get_num_threads():
        torch.set_num_threads(want)
        _claim(want)
    return want


def configure(threads: int | None = None, claim: bool = False) -> int:
    """Set torch's intra-op threads: ``threads``, else ``$DOE_EXT_NUM_THREADS``, else
    :func:`free_cores` less those other processes have claimed (at least 1). Returns the number set.
    ``claim``: hold the number set against other processes until :func:`release` (a command does, while
    it runs)."""
    if threads is None and os.environ.get(ENV, "").strip():
        text = os.environ[ENV].strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"${ENV} must be a positive integer, got {text!r}")
        threads = int(text)
    if threads is not None and not (isinstance(threads, int) and threads >= 1):
        raise ValueError(f"threads: `threads` must be a positive int, got {threads!r}")
    global _chosen
    with _claims_lock(claim or threads is None):  # two commands starting together take turns here
        chosen = threads is None
        if chosen:
            threads = max(1, min(free_cores(), usable_cores() - claimed_cores()))
        if claim:
            _claim(threads)
            _chosen = threads if chosen else None
    import torch

    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def _claims_lock(needed: bool):
    if not needed or fcntl is None:
        yield
        return
    folder = claims_dir()
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        lock = open(folder / ".lock", "a")
    except OSError:  # nowhere to claim: the free cores alone decide
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def openmp_runtimes() -> list[str]:
    """The OpenMP runtimes loaded in this process (file names, from /proc/self/maps; [] off Linux).
    One is expected: torch's. Two (e.g. libgomp and libiomp5) means two pools spinning at once."""
    try:
        with open("/proc/self/maps") as f:
            names = {os.path.basename(line.split()[-1]) for line in f if "/" in line}
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(_OPENMP) and ".so" in n)
