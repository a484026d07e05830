"""Outputs unchanged by a refactor (issue 47): answer a recipe sweep's dev questions again with the bank
that sweep built, and compare every answer with the answers it recorded then. The bank is only read;
DMoE (BM25 top-3, `score`) and the oracle router answer as experiments/recipe_sweep.py asked them.

    python experiments/outputs_unchanged.py --bank /work/runs/variety2-work/smollm2-135m-default-dev \\
        --reference reports/dmoe-recipes/capacity/rank/fiction-v1/default/eval.json --knowledge fiction-v1
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dev_split import dev_split, dmoe_and_oracle  # a sibling: experiments/ is on sys.path when run as a file
from doe_ext.dmoe import ExpertBank, load_base


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bank", type=Path, required=True, help="a bank experiments/recipe_sweep.py built")
    p.add_argument("--reference", type=Path, required=True, help="the eval.json that sweep wrote with it")
    p.add_argument("--knowledge", default="fiction-v1")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--out", type=Path, default=None, help="write the comparison here (JSON)")
    args = p.parse_args(argv)
    if not (args.bank / "bank.sqlite").is_file():
        p.error(f"--bank: {args.bank} holds no bank")
    ref = json.loads(args.reference.read_text())["samples"]
    base = load_base(args.base)
    bank = ExpertBank(args.bank)
    now, _ = dmoe_and_oracle(base, bank, dev_split(args.knowledge)[1])
    report = {}
    for method, rows in ref.items():
        then = {r["question"]: r["prediction"] for r in rows}
        differ = [{"question": s.question, "then": then.get(s.question), "now": s.prediction}
                  for s in now[method] if then.get(s.question) != s.prediction]
        report[method] = {"answers": len(now[method]), "identical": len(now[method]) - len(differ), "differ": differ}
        print(f"{method}: {report[method]['identical']} of {len(now[method])} answers identical")
    if args.out:
        args.out.write_text(json.dumps({"bank": str(args.bank), "reference": str(args.reference), **report}, indent=1))
    return 0 if all(not r["differ"] for r in report.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
