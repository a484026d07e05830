"""`make bench`: run every benchmarks/bench_*.py on the CPU (and CUDA when present), print a table,
write benchmarks/results/<host>-<date>.json.

    python benchmarks/run.py [--only knowledge_attention] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import doe_ext  # noqa: E402,F401
from benchmarks.common import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", help="bench name(s), e.g. knowledge_attention")
    ap.add_argument("--device", action="append", help="cpu and/or cuda (default: cpu, plus cuda if present)")
    args = ap.parse_args()
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    names = args.only or sorted(p.stem[len("bench_"):] for p in (ROOT / "benchmarks").glob("bench_*.py"))
    rows = []
    for name in names:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        for device in devices:
            print(f"[bench] {name} on {device} ...", flush=True)
            rows.extend(mod.run(device))
    info = machine()
    print("\n| bench | shape | dtype | device | ms | ratios | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda d: ", ".join(f"{k} {v}" for k, v in d.items())  # noqa: E731
    for r in rows:
        print(f"| {r['bench']} | {r['shape']} | {r['dtype']} | {r['device']} | {fmt(r.get('ms', {}))} | "
              f"{fmt(r.get('speedup', {}))} | {fmt(r.get('peak_mib', {}))} |")
    out = ROOT / "benchmarks" / "results" / f"{info['host']}-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    prev = json.loads(out.read_text())["rows"] if out.exists() else []
    keep = [r for r in prev if (r["bench"], r["device"]) not in {(x["bench"], x["device"]) for x in rows}]
    out.write_text(json.dumps({"machine": info, "command": " ".join(sys.argv), "rows": keep + rows}, indent=1))
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
