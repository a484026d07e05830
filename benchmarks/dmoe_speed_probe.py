"""The DMoE harness speed probe behind results/dmoe-speed-probes-2026-12-01.txt: the demo's methods on
the first N test questions with the demo's bank (reports/demo/dmoe/bank-<tag>, built by `make demo`).

    python benchmarks/dmoe_speed_probe.py DTYPE N TAG [METHODS] [BATCH] [SORT]
"""
import sys, time, json, torch
from pathlib import Path
from doe_ext.dmoe.base import load_base
from doe_ext.dmoe.bank import ExpertBank
from doe_ext.dmoe.build import sft_bank
from doe_ext.dmoe.data import load
from doe_ext.dmoe.evaluate import Harness, evaluate, summarize, METHODS
from doe_ext.dmoe.data import shots
dtype = sys.argv[1] if len(sys.argv) > 1 else "float32"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 48
docs, qa = load(); text = {d["id"]: d["text"] for d in docs}
dev = [q for q in qa if q["split"] == "dev"]; test = [q for q in qa if q["split"] == "test"]
base = load_base("smollm2-135m")
if dtype != "float32":
    base.model.to(getattr(torch, dtype))
bank = ExpertBank(next(Path("reports/demo/dmoe").glob("bank-*")))
methods = sys.argv[4].split(",") if len(sys.argv) > 4 else list(METHODS)
h = Harness(base, bank, shots=shots(dev, text), batch_size=int(sys.argv[5]) if len(sys.argv) > 5 else 16, sort_by_length=len(sys.argv) <= 6 or sys.argv[6] == "1",
            sft=sft_bank(base, bank) if "sft" in methods else None)
qs = test[:n]
t = time.perf_counter()
res = evaluate(h, qs, methods, progress=False)
s = summarize(res)
for m, v in s.items():
    print(f"{m:6s} em {v['em'][0]:.3f} f1 {v['f1'][0]:.3f} lat {v['latency_s']:.3f} trig {v['triggers']:.2f}", flush=True)
print("total", round(time.perf_counter() - t, 1), flush=True)
json.dump({m: [x.prediction for x in r] for m, r in res.items()}, open(f"/tmp/dmoe-probe-pred-{dtype}-{sys.argv[3] if len(sys.argv)>3 else 'x'}.json", "w"))
