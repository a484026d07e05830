"""Paired differences of a recipe sweep's variants against one of them (issue 45): per method (DMoE,
the oracle router), EM and hit rate, bootstrap 95% over the same questions. Reads
``DIR/<variant>/eval.json`` as experiments/recipe_sweep.py writes them; writes ``DIR/paired.json``.

    python experiments/paired_sweep.py reports/dmoe-recipes/variety/shuffled default shuffled sentences
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from doe_ext.dmoe.metrics import hit, paired_ci

SCORES = {"em": lambda s: s["em"], "hit": lambda s: hit(s["prediction"], s["answers"])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir")
    p.add_argument("baseline")
    p.add_argument("variants", nargs="+")
    args = p.parse_args(argv)
    root = Path(args.dir)

    def samples(v):
        return json.loads((root / v / "eval.json").read_text())["samples"]

    ref, out = samples(args.baseline), {}
    for v in args.variants:
        got = samples(v)
        for method, rows in got.items():
            base_rows = ref[method]
            if [r["question"] for r in rows] != [r["question"] for r in base_rows]:
                raise ValueError(f"{v}/{method}: not the questions of {args.baseline}")
            for name, score in SCORES.items():
                d = paired_ci([score(r) for r in rows], [score(r) for r in base_rows])
                out[f"{v} - {args.baseline} [{method}] {name}"] = d
                print(f"{v} - {args.baseline} [{method}] {name}: {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]")
    (root / "paired.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
