"""Two builds started in the same instant (issue 46, part 1): each would measure the other idle and take
every core. ``doe-ext dmoe build`` of 8 experts (the default recipe, SmolLM2-135M, fiction-v1's first 8
train documents: made up), twice at once into two banks, with the default threads (each command claims
the cores it took, the first gives one back when the second starts: ``doe_ext.threads``), with every
core each (before the thread policy) and with one thread each (what the default should match); one
build alone with the default for scale. Side by side in one run.

    python benchmarks/run.py --only threads_pair
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.bench_threads import fiction_docs, start, timed
from doe_ext.threads import usable_cores


def pair(work: Path, threads: int | None, docs: Path) -> float:
    """Two builds started together: seconds until both are done."""
    t0 = time.perf_counter()
    procs = [start("dmoe", "build", str(docs), "--out", str(work / f"pair-{threads}-{i}"), "--no-progress",
                   "--no-reader", threads=threads) for i in range(2)]
    if any(p.wait() for p in procs):
        raise RuntimeError("a build of the pair failed")
    return time.perf_counter() - t0


def run(device: str) -> list[dict]:
    if device != "cpu":
        return []
    with tempfile.TemporaryDirectory() as tmp:
        work, docs = Path(tmp), Path(tmp) / "docs.jsonl"
        fiction_docs(docs, 8)
        alone = timed("dmoe", "build", str(docs), "--out", str(work / "alone"), "--no-progress", "--no-reader",
                      threads=None)
        pairs = {t: pair(work, t, docs) for t in (1, None, usable_cores())}
    return [{"bench": "threads_pair", "shape": "two doe-ext dmoe builds (8 experts each) started together, "
             f"{'default threads' if t is None else f'--threads {t}'} each", "dtype": "float32", "device": "cpu",
             "ms": {"both built": round(1e3 * s), "one alone (default)": round(1e3 * alone)},
             "speedup": {"/ one alone": round(s / alone, 2), "/ --threads 1 each": round(s / pairs[1], 2)}}
            for t, s in pairs.items()]


if __name__ == "__main__":
    for row in run("cpu"):
        print(row)
