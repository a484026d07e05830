"""Shared benchmark harness: interleaved timing (median of pairs), peak memory, result rows.

Every bench_<op>.py exposes ``run(device: str) -> list[dict]``; ``benchmarks/run.py`` (``make bench``)
runs them all, prints one table and writes ``benchmarks/results/<host>-<date>.json``.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(fns: dict[str, Callable[[], object]], device: str, pairs: int = 15,
                        warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each fn, timed round-robin (A B C A B C ...) so that drift in
    the machine's speed hits every variant alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(pairs):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated above what was live before ``fn`` ran (tensors only).

    CUDA: the caching allocator's peak counter. CPU: the profiler's allocation events, summed in
    time order (what the c10 CPU allocator handed out, including inside C++ ops)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def machine() -> dict:
    import platform

    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth in bytes/s (read + write), the floor a memory-bound op meets."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = interleaved_medians({"copy": lambda: y.copy_(x)}, device, pairs=10)["copy"]
    return 2 * nbytes / t


def compare(name: str, shape: str, dtype: torch.dtype, device: str, variants: dict[str, Callable[[], object]],
            fused: str = "fused", pairs: int = 15, extra: dict | None = None) -> dict:
    """Time and measure every variant side by side; ratios are (other variant's time) / (fused time)."""
    t = interleaved_medians(variants, device, pairs=pairs)
    mem = {k: peak_memory_bytes(fn, device) for k, fn in variants.items()}
    row = {"bench": name, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "device": device,
           "ms": {k: round(v * 1e3, 4) for k, v in t.items()},
           "peak_mib": {k: round(v / 2**20, 2) for k, v in mem.items()},
           "speedup": {k: round(t[k] / t[fused], 3) for k in t if k != fused}}
    row.update(extra or {})
    return row
