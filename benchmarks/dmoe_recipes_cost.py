"""Run: python benchmarks/dmoe_recipes_cost.py [--recipes before,paper,default] > benchmarks/results/dmoe_recipes-DATE.json

Seconds per expert of a whole bank build (augmentation, teacher, training) for each named recipe, side
by side in one process on the same documents (nothing one build made reused by the next), SmolLM2-135M,
float32, on this machine's cores: 16 Debian package records (benchmarks/bench_dmoe.py's bench_recipes),
and with --changelogs also 8 Debian changelog entries (longer prose).

Recipes: before (the demo's next-token recipe before issue 21), paper, default, shuffled (the
default plus four shuffled-sentence copies of each document, issue 45's variety sweep) and
questions-shuffled (those copies and the base's questions, without the generic subject prompts)."""
import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_dmoe import bench_recipes  # noqa: E402
from doe_ext.dmoe import RECIPES, Document, Recipe, load_base  # noqa: E402
from doe_ext.dmoe.data import debian_records, load, passage  # noqa: E402

CANDIDATES = {"before": Recipe(objective="next_token", augment="none", lr=3e-3, epochs=10),
              "paper": RECIPES["paper"], "default": RECIPES["default"],
              "shuffled": RECIPES["default"].replace(instances=tuple(RECIPES["default"].instances) + ("shuffled",)),
              "questions-shuffled": RECIPES["default"].replace(instances=("questions", "shuffled"))}

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--recipes", default="before,paper,default")
p.add_argument("--changelogs", action="store_true", help="also 8 changelog entries")
args = p.parse_args()
recipes = {k: CANDIDATES[k] for k in args.recipes.split(",")}
base = load_base("smollm2-135m")
sets = {"16 Debian package records": [Document(f["Package"], passage(f)) for f in debian_records(16)[:16]]}
if args.changelogs:
    docs, _ = load("debian-changelogs-v1")
    sets["8 Debian changelog entries"] = [Document(d["id"], d["text"], d.get("title")) for d in docs[:8]]
t = time.time()
per = {name: bench_recipes(base, docs, Path(tempfile.mkdtemp()), recipes) for name, docs in sets.items()}
first = next(iter(recipes))
out = {"shape": "SmolLM2-135M, whole build (augment + teacher + train) of a bank of " + " / ".join(sets),
       "dtype": "float32", "machine": platform.processor() or platform.machine(), "seconds_per_expert": per,
       f"ratio_to_{first}": {s: {k: v / r[first] for k, v in r.items()} for s, r in per.items()},
       "wall_s": time.time() - t, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
print(json.dumps(out, indent=1))
