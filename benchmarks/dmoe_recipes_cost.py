"""Run: python benchmarks/dmoe_recipes_cost.py > benchmarks/results/dmoe_recipes-DATE.json

Seconds per expert of a whole bank build for three recipes, side by side in one process on the same
16 Debian package records (benchmarks/bench_dmoe.py's bench_recipes), SmolLM2-135M, float32, 2 CPU cores."""
import json, sys, tempfile, time, platform
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_dmoe import bench_recipes
from doe_ext.dmoe import Document, load_base
from doe_ext.dmoe.data import debian_records, passage
base = load_base("smollm2-135m")
recs = debian_records(16)
docs = [Document(f["Package"], passage(f)) for f in recs[:16]]
t = time.time()
per = bench_recipes(base, docs, Path(tempfile.mkdtemp()))
before = per["passage, next-token (before)"]
out = {"shape": "SmolLM2-135M, a bank of 16 Debian package records, whole build (augment + teacher + train)",
       "dtype": "float32", "machine": platform.processor() or platform.machine(), "seconds_per_expert": per,
       "ratio_to_before": {k: v / before for k, v in per.items()}, "wall_s": time.time() - t,
       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
print(json.dumps(out, indent=1))
