"""Dev sweep of what each expert trains on (issue 45, items 2 and 3) on a knowledge set's dev split
(fiction-v1 unless --knowledge names another): one bank of the dev questions' documents per recipe
variant, DMoE with BM25 routing and with the oracle router (the question's own expert alone), in the
layout the experts were trained in; seconds per expert measured on the build (a bank already built
is reused and its seconds left out). On fiction-v1, made-up facts: closed book cannot know them.

    python experiments/recipe_sweep.py --out reports/dmoe-recipes/variety --work /tmp/recipe-sweep \\
        --variants default,chunks,rank16
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dev_split import dev_split, dmoe_and_oracle  # a sibling: experiments/ is on sys.path when run as a file
from doe_ext.dmoe import ExpertBank, LoRAConfig, build_bank, load_base
from doe_ext.dmoe.build import forget_made
from doe_ext.dmoe.evaluate import markdown, summarize, write
from doe_ext.dmoe.recipe import DEFAULT

VARIANTS = {
    "default": DEFAULT,
    "chunks": DEFAULT.replace(instances=("subject", "questions", "chunks")),
    "rank8": DEFAULT.replace(lora=LoRAConfig(8, 32.0)),  # ranks at the default's scale alpha / rank = 4
    "rank16": DEFAULT.replace(lora=LoRAConfig(16, 64.0)),
    "chunks-rank16": DEFAULT.replace(instances=("subject", "questions", "chunks"), lora=LoRAConfig(16, 64.0)),
    "epochs24": DEFAULT.replace(epochs=24),
    "sentences": DEFAULT.replace(augment="sentences"),
    "shuffled": DEFAULT.replace(instances=("subject", "questions", "shuffled")),
    "sentences-shuffled": DEFAULT.replace(augment="sentences", instances=("subject", "questions", "shuffled")),
    "questions-shuffled": DEFAULT.replace(instances=("questions", "shuffled")),  # no generic subject prompts
    # the shuffled copies at the default's cost: half the epochs (each epoch has more instances)
    "shuffled-e8": DEFAULT.replace(instances=("subject", "questions", "shuffled"), epochs=8),
    "questions-shuffled-e8": DEFAULT.replace(instances=("questions", "shuffled"), epochs=8),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="reports/dmoe-recipes/variety")
    p.add_argument("--work", default="/tmp/recipe-sweep")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--knowledge", default="fiction-v1", help="a frozen set: a bank of its dev questions' documents")
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    base = load_base(args.base)
    dev_docs, dev = dev_split(args.knowledge)
    result = {}
    for name in args.variants.split(","):
        recipe = VARIANTS[name]
        where = f"{args.base}-{name}-dev" if args.knowledge == "fiction-v1" else f"{args.knowledge}-{args.base}-{name}-dev"
        bank = ExpertBank(work / where, create=True, fingerprint=base.fingerprint,
                          base_name=args.base, recipe=recipe)
        forget_made()  # each variant's seconds include its own augmentation
        t0 = time.perf_counter()
        done = build_bank(base, dev_docs, bank, progress=False)
        per_expert = (time.perf_counter() - t0) / len(done) if done else None  # None: nothing built now
        res, _ = dmoe_and_oracle(base, bank, dev)
        summary = summarize(res)
        write(res, summary, out / name)
        result[name] = {"recipe": recipe.to_dict(), "seconds_per_expert": per_expert, "summary": summary,
                        "threads": torch.get_num_threads()}
        print(f"## {name} ({per_expert and round(per_expert, 1)} s/expert)\n\n{markdown(summary)}", flush=True)
        prev = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").is_file() else {}
        (out / "sweep.json").write_text(json.dumps({**prev, **result}, indent=1))


if __name__ == "__main__":
    main()
