"""The build's commit grain (issue 46, part 2): a group of ``--group-size`` documents is augmented,
answered and trained together and committed when it finishes, so a kill loses at most one group. The
cost of a smaller group, side by side in one run: ``doe-ext dmoe build`` of 32 experts (the default
recipe, SmolLM2-135M, fiction-v1's first 32 train documents: made up) at group sizes 4, 8, 16 and 32,
each into a fresh bank, default threads.

    python benchmarks/run.py --only build_group
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.bench_threads import fiction_docs, timed

DOCS, GROUPS = 32, (4, 8, 16, 32)


def run(device: str) -> list[dict]:
    if device != "cpu":
        return []
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs.jsonl"
        fiction_docs(docs, DOCS)
        got = {g: timed("dmoe", "build", str(docs), "--out", str(Path(tmp) / f"bank-{g}"), "--no-progress",
                           "--no-reader", "--group-size", str(g), threads=None) for g in GROUPS}
    return [{"bench": "build_group", "shape": f"doe-ext dmoe build ({DOCS} experts), --group-size {g}",
             "dtype": "float32", "device": "cpu", "ms": {"build": round(1e3 * s)},
             "speedup": {"s / expert": round(s / DOCS, 2), f"build / group {max(GROUPS)}": round(s / got[max(GROUPS)], 2)}}
            for g, s in got.items()]


if __name__ == "__main__":
    for row in run("cpu"):
        print(row)
