"""Does asking the experts in the layout they were trained in hold on the Debian dev splits (issue 45,
item 5)? Per knowledge set: a bank of its dev questions' documents (the default recipe), then PRAG and
DMoE asked in the chat template (`ask`'s prompt before) and in the experts' own layout (now), with
hit rate, EM and degenerate answers. Dev split only.

    python experiments/layout_check.py --knowledge debian-packages-v1 --out reports/dmoe-recipes/layout
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from doe_ext.dmoe import Document, ExpertBank, build_bank, load_base
from doe_ext.dmoe.data import load
from doe_ext.dmoe.evaluate import Harness, evaluate, markdown, summarize, write
from doe_ext.dmoe.metrics import hit, paired_ci
from doe_ext.dmoe.recipe import DEFAULT
from reader_study import ChatHarness  # a sibling script: experiments/ is on sys.path when run as a file


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--knowledge", default="debian-packages-v1")
    p.add_argument("--out", default="reports/dmoe-recipes/layout")
    p.add_argument("--work", default="/tmp/layout-check")
    p.add_argument("--base", default="smollm2-135m")
    args = p.parse_args(argv)
    base = load_base(args.base)
    docs, dev = load(args.knowledge, "dev")
    wanted = {q["doc_id"] for q in dev}
    bank = ExpertBank(Path(args.work) / f"{args.knowledge}-{args.base}-dev", create=True,
                      fingerprint=base.fingerprint, base_name=args.base, recipe=DEFAULT)
    build_bank(base, [Document(d["id"], d["text"], d.get("title")) for d in docs if d["id"] in wanted], bank,
               progress=False)
    out = Path(args.out) / f"{args.knowledge}-{args.base}"
    res = {}
    for name, harness in (("chat", ChatHarness), ("own layout", Harness)):
        got = evaluate(harness(base, bank), dev, ["rag", "prag", "dmoe"], progress=False)
        res.update({f"{m} ({name})": v for m, v in got.items() if m != "rag" or name == "chat"})
    summary = summarize(res)
    write(res, summary, out)
    hits = {m: [hit(s.prediction, s.answers) for s in v] for m, v in res.items()}
    paired = {f"{m} (own layout) - {m} (chat)": paired_ci(hits[f"{m} (own layout)"], hits[f"{m} (chat)"])
              for m in ("prag", "dmoe")}
    (out / "paired_hit.json").write_text(json.dumps(paired, indent=1))
    print(f"## {args.knowledge}, {args.base}, dev ({len(dev)} questions, {len(bank)} documents)\n\n{markdown(summary)}"
          + "\n".join(f"{k}: {v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]" for k, v in paired.items()), flush=True)


if __name__ == "__main__":
    main()
