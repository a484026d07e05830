"""Do the streamed decoding steps (DMoE's default since issue 22 part 3, `doe_ext.nn.streaming_linears`)
change any prediction? Re-runs the prompt-only methods of the committed final tables (closed book, gold
passage, Basic-RAG: the rows that need no trained expert) on the same test questions, with the same
bank documents (random experts: these methods never apply them), and compares every prediction with
the one in `reports/dmoe-final/<set>-<base>/eval.json`, which ATen's GEMM produced. RAG's passages
come from BM25 over the bank's text surrogates, which held the trained bank's augmentations: here the
surrogate is the document alone, so RAG is compared only where it retrieved the reference's passages.

    python -m benchmarks.check_streaming_predictions [--tables debian-packages-v1-smollm2-135m ...]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("base", "gold", "rag")


def check(table: str, methods=METHODS) -> dict:
    from benchmarks.bench_dmoe import random_bank
    from doe_ext.dmoe.base import load_base
    from doe_ext.dmoe.data import load
    from doe_ext.dmoe.evaluate import Harness, evaluate
    from doe_ext.dmoe.data import sample, shots
    from experiments.dmoe_report import BATCH

    ref = json.loads((ROOT / "reports" / "dmoe-final" / table / "final.json").read_text())
    samples = json.loads((ROOT / "reports" / "dmoe-final" / table / "eval.json").read_text())["samples"]
    docs, qa = load(ref["knowledge"])
    text = {d["id"]: d["text"] for d in docs}
    test = sample([q for q in qa if q["split"] == "test"], ref["questions"])
    assert ref["bank_docs"] == "questions", ref["bank_docs"]
    keep = {q["doc_id"] for q in test}
    base = load_base(ref["base"])
    with tempfile.TemporaryDirectory() as work:
        bank = random_bank(base, [(d["id"], d["text"]) for d in docs if d["id"] in keep], Path(work) / "bank")
        h = Harness(base, bank, shots=shots([q for q in qa if q["split"] == "dev"], text), batch_size=BATCH,
                    compose=ref["compose"], temperature=ref["temperature"])
        assert h.dmoe.streaming
        t = time.perf_counter()
        res = evaluate(h, test, list(methods), progress=False)
        seconds = time.perf_counter() - t
    out = {"table": table, "questions": len(test), "seconds": round(seconds, 1), "methods": {}}
    for m in methods:
        got = [s.prediction for s in res[m]]
        want = [s["prediction"] for s in samples[m]]
        assert [s.question for s in res[m]] == [s["question"] for s in samples[m]], f"{table} {m}: other questions"
        same_input = [list(s.passages) == list(r["passages"]) for s, r in zip(res[m], samples[m])]
        diff = [{"question": res[m][i].question, "reference": want[i], "streamed": got[i]}
                for i in range(len(got)) if same_input[i] and got[i] != want[i]]
        compared = sum(same_input)
        out["methods"][m] = {"compared": compared, "other_passages": len(got) - compared,
                             "equal": compared - len(diff), "differ": len(diff), "differences": diff}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", nargs="+", default=sorted(p.name for p in (ROOT / "reports" / "dmoe-final").iterdir()
                                                          if (p / "eval.json").is_file()))
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for table in args.tables:
        rows.append(check(table))
        r = rows[-1]
        print(table, {m: f"{v['equal']} equal, {v['differ']} differ, {v['other_passages']} other passages"
                      for m, v in r["methods"].items()}, f"{r['seconds']} s", flush=True)
    print(json.dumps(rows, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
