"""Threads beside a busy process (issue 46, part 1): what a user sees from the ``doe-ext`` command, a
build of 8 experts (the default recipe, SmolLM2-135M, fiction-v1's first 8 train documents: made up)
and 20 ``ask``s on that bank, each a fresh process, with the command's default threads and with
``--threads`` at every usable core (the default before the thread policy), idle and beside one
``python -c "while True: pass"``, side by side in one run. Two builds started together:
``bench_threads_pair.py``.

    python benchmarks/run.py --only threads
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from doe_ext.dmoe.data import load
from doe_ext.threads import ENV, usable_cores

LAUNCH = "import sys, doe_ext_cli; sys.exit(doe_ext_cli.main(sys.argv[1:]))"


def start(*argv: str, threads: int | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    extra = [] if threads is None else ["--threads", str(threads)]
    return subprocess.Popen([sys.executable, "-c", LAUNCH, *argv, *extra], env=env, stdout=subprocess.DEVNULL)


def timed(*argv: str, threads: int | None) -> float:
    t0 = time.perf_counter()
    if start(*argv, threads=threads).wait():
        raise RuntimeError(f"doe-ext {' '.join(argv)} failed")
    return time.perf_counter() - t0


def fiction_docs(path: Path, n: int) -> list[dict]:
    """fiction-v1's first ``n`` train documents (made up) written as a DOCS.jsonl at ``path``."""
    train = [d for d in load("fiction-v1")[0] if d["split"] == "train"][:n]
    path.write_text("".join(json.dumps({"id": d["id"], "text": d["text"], "title": d["title"]}) + "\n" for d in train))
    return train


def measure(work: Path, threads: int | None, busy: bool, docs: Path, questions: list[str]) -> dict:
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        bank = work / f"bank-{threads}-{busy}"
        build = timed("dmoe", "build", str(docs), "--out", str(bank), "--no-progress", "--no-reader", threads=threads)
        asks = sum(timed("dmoe", "ask", str(bank), q, threads=threads) for q in questions)
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()
    return {"build_s": round(build, 1), "asks_s": round(asks, 1)}


def run(device: str) -> list[dict]:
    if device != "cpu":
        return []
    cores = usable_cores()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        docs = work / "docs.jsonl"
        ids = {d["id"] for d in fiction_docs(docs, 8)}
        questions = [q["question"] for q in load("fiction-v1")[1] if q["doc_id"] in ids][:20]
        got = {(t, b): measure(work, t, b, docs, questions) for b in (False, True) for t in (cores, None)}
    for (t, b), r in got.items():
        idle = got[(t, False)]
        rows.append({"bench": "threads", "shape": f"doe-ext dmoe build (8 experts) + 20 asks, "
                     f"{'default threads' if t is None else f'--threads {t}'}, {'beside a busy process' if b else 'idle'}",
                     "dtype": "float32", "device": "cpu", "ms": {"build": 1e3 * r["build_s"], "asks": 1e3 * r["asks_s"]},
                     "speedup": {"build / idle": round(r["build_s"] / idle["build_s"], 2),
                                 "asks / idle": round(r["asks_s"] / idle["asks_s"], 2)}})
    return rows


if __name__ == "__main__":
    for row in run("cpu"):
        print(row)
