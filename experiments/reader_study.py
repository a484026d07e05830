"""Dev study of the knowledge reader (issue 45) on fiction-v1, whose facts are all made up: closed
book cannot know them, so what the experts carry is measured without the base's prior.

Dev split only. The reader trains on the train split's 160 documents (their experts, built with the
bank recipe) and its 800 questions, worded from another pool than the dev questions; it is scored on
the 40 dev documents' 80 questions, with a bank of their experts alone. Per prompt layout (the chat
template that ``doe-ext dmoe ask`` uses, and the few-shot layout the default recipe's experts are
distilled in), the methods without the reader, then PRAG and DMoE with it and the reader alone (a
control: it must not carry answers by itself), with paired bootstrap intervals over the questions.

    python experiments/reader_study.py --out reports/dmoe-recipes/reader --work /tmp/reader-study

Banks and readers are cached under ``--work``; a re-run computes only what is missing.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

from doe_ext.dmoe import Document, ExpertBank, LoRAConfig, build_bank, load_base
from doe_ext.dmoe.augment import SHOTS, qa_prompt
from doe_ext.dmoe.data import load
from doe_ext.dmoe.evaluate import Harness, evaluate, markdown, summarize, write
from doe_ext.dmoe.metrics import exact_match, hit, paired_ci
from doe_ext.dmoe.reader import Reader, ReaderRecipe
from doe_ext.dmoe.reader_training import train_reader
from doe_ext.dmoe.recipe import RECIPES

OFF = ("base", "gold", "rag", "prag", "dmoe")
ON = ("prag", "dmoe", "reader")
PAIRS = (("dmoe + reader", "dmoe"), ("prag + reader", "prag"), ("dmoe + reader", "rag"), ("dmoe", "rag"),
         ("prag + reader", "rag"),
         ("prag", "rag"), ("dmoe + reader", "base"), ("reader alone", "base"))


class ChatHarness(Harness):
    """Every method in the chat template, the experts' too (the layout `ask` used before issue 45)."""

    def prompt(self, question, passages=None, experts=False):
        return qa_prompt(self.tok, question, passages)


def bank_of(base, docs: list[dict], path: Path, recipe) -> ExpertBank:
    bank = ExpertBank(path, create=True, fingerprint=base.fingerprint, base_name=base.name, recipe=recipe)
    t0 = time.perf_counter()
    done = build_bank(base, [Document(d["id"], d["text"], d.get("title")) for d in docs], bank, progress=False)
    if done:
        print(f"{path}: {len(done)} experts in {time.perf_counter() - t0:.0f} s "
              f"({(time.perf_counter() - t0) / len(done):.1f} s/expert)", flush=True)
    return bank


def paired(res: dict, a: str, b: str, metric) -> list[float]:
    x = [metric(s["prediction"], s["answers"]) for s in res[a]]
    y = [metric(s["prediction"], s["answers"]) for s in res[b]]
    return list(paired_ci(x, y))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="reports/dmoe-recipes/reader")
    p.add_argument("--work", default="/tmp/reader-study", help="banks and readers (cached)")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    p.add_argument("--prompts", default="chat,fewshot")
    p.add_argument("--reader", default="{}", help="ReaderRecipe fields as JSON (e.g. '{\"epochs\": 4}')")
    args = p.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = load_base(args.base)
    recipe = RECIPES[args.recipe]
    fields = json.loads(args.reader)
    if "lora" in fields:
        fields["lora"] = LoRAConfig(**fields["lora"])
    rr = dataclasses.replace(ReaderRecipe(), **fields)
    docs, qs = load("fiction-v1")
    split = lambda rows, s: [r for r in rows if r["split"] == s]  # noqa: E731
    train_bank = bank_of(base, split(docs, "train"), work / f"{args.base}-{args.recipe}-train", recipe)
    dev_bank = bank_of(base, split(docs, "dev"), work / f"{args.base}-{args.recipe}-dev", recipe)
    dev = split(qs, "dev")
    study = {"knowledge": "fiction-v1", "split": "dev", "questions": len(dev), "base": args.base,
             "recipe": recipe.to_dict(), "reader_recipe": dataclasses.asdict(rr), "prompts": {}}
    for layout in args.prompts.split(","):
        shots = list(SHOTS) if layout == "fewshot" else []
        harness = Harness if shots else ChatHarness
        key = hashlib.sha256(json.dumps([layout, dataclasses.asdict(rr), recipe.to_dict()],
                                        sort_keys=True, default=str).encode()).hexdigest()[:12]
        path = work / f"reader-{args.base}-{layout}-{key}.safetensors"
        if path.is_file():
            reader = Reader.load(path)
        else:
            reader = train_reader(base, train_bank, split(qs, "train"), rr, name=f"{args.base}-{args.recipe}-{layout}",
                                  shots=shots)
            reader.save(path)
        print(f"{layout}: reader {reader.info}", flush=True)
        t0 = time.perf_counter()
        res = evaluate(harness(base, dev_bank, shots=shots, reader=False), dev, list(OFF), progress=False)
        on = evaluate(harness(base, dev_bank, shots=shots, reader=reader), dev, list(ON), progress=False)
        res.update({"prag + reader": on["prag"], "dmoe + reader": on["dmoe"], "reader alone": on["reader"]})
        summary = summarize(res)
        write(res, summary, out / layout)
        rows = {m: [dataclasses.asdict(s) for s in v] for m, v in res.items()}
        study["prompts"][layout] = {
            "reader": reader.info, "eval_seconds": round(time.perf_counter() - t0, 1),
            "paired": {f"{a} - {b}": {"em": paired(rows, a, b, exact_match), "hit": paired(rows, a, b, hit)}
                       for a, b in PAIRS}}
        print(f"## {layout}\n\n{markdown(summary)}", flush=True)
    (out / "study.json").write_text(json.dumps(study, indent=1))
    lines = [f"# The knowledge reader on fiction-v1 (dev split, {len(dev)} questions, {args.base}, recipe {args.recipe})",
             "", "Made-up facts: closed book cannot know them. `hit`: a gold answer inside the prediction.", ""]
    for layout, s in study["prompts"].items():
        lines += [f"## Prompt: {layout}", "", (out / layout / "eval.md").read_text(), "Paired differences "
                  "(mean [95% bootstrap interval] over the questions):", "", "| pair | EM | hit |", "|---|---|---|"]
        lines += [f"| {k} | {v['em'][0]:+.3f} [{v['em'][1]:+.3f}, {v['em'][2]:+.3f}] | {v['hit'][0]:+.3f} "
                  f"[{v['hit'][1]:+.3f}, {v['hit'][2]:+.3f}] |" for k, v in s["paired"].items()]
        lines += ["", f"Reader: {json.dumps(s['reader'])}; evaluation {s['eval_seconds']} s.", ""]
    (out / "study.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
