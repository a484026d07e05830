"""Experts trained to be composed (issue 45, item 4) on a knowledge set's dev split (fiction-v1 unless
--knowledge names another): the default recipe's bank of the dev questions' documents (built as
experiments/recipe_sweep.py builds it, or reused), then a second bank whose experts train beside k - 1
of the first bank's experts, frozen and weighted as the inference composition weighs them (BM25 on the
document's own base-written questions, `score` at T = 1, averaged over its questions; the document's
first sentence when it has none). Both banks answer the dev questions with DMoE (BM25 top-3) and the
oracle router (the question's own expert alone): the report is each bank's gap oracle top-1 − DMoE.

    python experiments/composed_sweep.py --out reports/dmoe-recipes/composed --work /work/runs/variety2-work
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from dev_split import dev_split, dmoe_and_oracle  # a sibling: experiments/ is on sys.path when run as a file
from doe_ext.dmoe import Document, ExpertBank, build_bank, load_base
from doe_ext.dmoe.build import augmentations, commit, instances
from doe_ext.dmoe.evaluate import markdown, summarize, write
from doe_ext.dmoe.experts import ExpertSet
from doe_ext.dmoe.recipe import DEFAULT
from doe_ext.dmoe.reader_training import routed_set
from doe_ext.dmoe.train import Companions, train_experts


def companion_sets(bank: ExpertBank, docs: list[Document], augs, top_k: int) -> Companions:
    """Per document, its own weight and its ``top_k - 1`` companions (ids of ``bank``) with theirs."""
    union: dict[str, int] = {}
    sets, own = [], []
    for d, a in zip(docs, augs):
        queries = [qa["question"] for qa in a.qa] or [d.text.split(".")[0]]
        mean = defaultdict(float)
        for q in queries:
            for e, w in routed_set(bank, q, d.id, top_k):
                mean[e] += w / len(queries)
        others = sorted(((e, w) for e, w in mean.items() if e != d.id), key=lambda x: -x[1])[:top_k - 1]
        total = mean[d.id] + sum(w for _, w in others)
        own.append(mean[d.id] / total)
        sets.append([(union.setdefault(e, len(union)), w / total) for e, w in others])
    tensors = [bank.get(e) for e in union]
    names = sorted({k.rsplit(".", 1)[0] for k in tensors[0]})
    stack = ExpertSet({n: torch.stack([t[f"{n}.lora_a"] for t in tensors]) for n in names},
                      {n: torch.stack([t[f"{n}.lora_b"] for t in tensors]) for n in names})
    return Companions(stack, sets, own)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("reports/dmoe-recipes/composed"))
    p.add_argument("--work", type=Path, default=Path("/tmp/recipe-sweep"))
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--knowledge", default="fiction-v1")
    p.add_argument("--top-k", type=int, default=3)
    args = p.parse_args(argv)
    base = load_base(args.base)
    dev_docs, dev = dev_split(args.knowledge)
    tag = f"{args.base}-%s-dev" if args.knowledge == "fiction-v1" else f"{args.knowledge}-{args.base}-%s-dev"
    alone = ExpertBank(args.work / (tag % "default"), create=True, fingerprint=base.fingerprint,
                       base_name=args.base, recipe=DEFAULT)
    build_bank(base, dev_docs, alone, progress=False)
    augs = augmentations(base, alone, dev_docs)
    items = list(zip(dev_docs, augs))
    insts = instances(base, alone, items)
    comp = companion_sets(alone, dev_docs, augs, args.top_k)
    composed = ExpertBank(args.work / (tag % "composed"), create=True, fingerprint=base.fingerprint,
                          base_name=args.base, recipe=DEFAULT)
    t0 = time.perf_counter()
    todo = [i for i, d in enumerate(dev_docs) if d.id not in composed]  # a stopped run resumes
    if todo:
        part = Companions(comp.experts, [comp.sets[i] for i in todo], [comp.own[i] for i in todo])
        trained = train_experts(base, [items[i] for i in todo], DEFAULT, instances=[insts[i] for i in todo],
                                companions=part)
        for i, e in zip(todo, trained):
            commit(composed, *items[i], e)
    seconds = (time.perf_counter() - t0) / len(todo) if todo else None
    result = {"own_weight_mean": sum(comp.own) / len(comp.own), "train_seconds_per_expert": seconds}
    for name, bank in (("alone", alone), ("composed", composed)):
        res, _ = dmoe_and_oracle(base, bank, dev)
        summary = summarize(res)
        write(res, summary, args.out / args.knowledge / name)
        result[name] = summary
        print(f"## {name}\n\n{markdown(summary)}", flush=True)
    (args.out / args.knowledge).mkdir(parents=True, exist_ok=True)
    (args.out / args.knowledge / "sweep.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
