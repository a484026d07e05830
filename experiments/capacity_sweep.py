"""Dev sweep of the experts' capacity by depth (issue 45, item 3): experts of the default recipe on the
MLPs of the last 1, 2 and 4 decoder layers, one bank of the dev questions' documents per depth (fiction-v1
unless --knowledge names another), DMoE (BM25 top-3, the bank's composition) and the oracle router (the
question's own expert alone), in the experts' layout. A depth of 1 is DMoE's own site (a trigger
re-runs the last MLP only); deeper experts make the KV cache of their layers stale, so a trigger runs
the triggered rows again from their first token: the tokens run again per answer are recorded beside
the scores, and seconds per expert of each build.

    python experiments/capacity_sweep.py --out reports/dmoe-recipes/capacity --work /tmp/capacity --depths 1,2,4
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dev_split import dev_split, dmoe_and_oracle  # a sibling: experiments/ is on sys.path when run as a file
from doe_ext.dmoe import Document, ExpertBank, ExpertSite, build_bank, load_base
from doe_ext.dmoe.build import augmentations, commit, forget_made
from doe_ext.dmoe.deep import train_deep
from doe_ext.dmoe.evaluate import markdown, summarize, write
from doe_ext.dmoe.recipe import DEFAULT


def deep_bank(base, docs: list[Document], bank: ExpertBank, site: ExpertSite, group_size: int) -> int:
    """Experts of ``bank``'s recipe on ``site``'s layers for the documents not in it yet; returns how many."""
    todo = [d for d in docs if d.id not in bank]
    for s in range(0, len(todo), group_size):
        group = todo[s:s + group_size]
        items = list(zip(group, augmentations(base, bank, group)))
        for (d, a), e in zip(items, train_deep(base, site, items, bank.recipe)):
            commit(bank, d, a, e)
    return len(todo)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="reports/dmoe-recipes/capacity")
    p.add_argument("--work", default="/tmp/capacity")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--knowledge", default="fiction-v1", help="a frozen set: a bank of its dev questions' documents")
    p.add_argument("--depths", default="1,2,4", help="how many of the last decoder layers carry the experts")
    p.add_argument("--limit", type=int, default=None, help="the first N dev questions (a smoke run)")
    p.add_argument("--group-size", type=int, default=16, help="documents trained together (deep: one padded batch)")
    args = p.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    base = load_base(args.base)
    dev_docs, dev = dev_split(args.knowledge, args.limit)
    result = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").is_file() else {}
    for depth in map(int, args.depths.split(",")):
        name = f"depth{depth}"
        bank = ExpertBank(work / f"{args.knowledge}-{args.base}-{name}", create=True, fingerprint=base.fingerprint,
                          base_name=args.base, recipe=DEFAULT)
        forget_made()  # each depth's seconds include its own augmentation and teacher answers
        site = None if depth == 1 else ExpertSite(base.model, depth=depth)
        t0 = time.perf_counter()
        done = (len(build_bank(base, dev_docs, bank, progress=False)) if site is None
                else deep_bank(base, dev_docs, bank, site, args.group_size))
        per_expert = (time.perf_counter() - t0) / done if done else None  # None: nothing built now
        res, models = dmoe_and_oracle(base, bank, dev, site)
        summary = summarize(res)
        write(res, summary, out / name)
        result[name] = {"depth": depth, "recipe": DEFAULT.to_dict(), "seconds_per_expert": per_expert,
                        "summary": summary, "threads": torch.get_num_threads(),
                        "recomputed_tokens_per_answer": {n: m.recomputed_tokens / len(dev) for n, m in models.items()},
                        "stale_layer_share": 0.0 if site is None else site.stale_layer_share}
        print(f"## {name} ({per_expert and round(per_expert, 1)} s/expert)\n\n{markdown(summary)}", flush=True)
        (out / "sweep.json").write_text(json.dumps(result, indent=1))
        if site is not None:
            site.detach()
        bank.close()


if __name__ == "__main__":
    main()
