"""What the dev sweeps share (experiments/recipe_sweep.py, capacity_sweep.py, composed_sweep.py,
outputs_unchanged.py; each imports this as a sibling, experiments/ being on sys.path when a script runs
as a file): a knowledge set's dev questions with their documents, and their answers by DMoE (BM25
top-3, the bank's composition) and by the oracle router (the question's own expert alone)."""
from __future__ import annotations

from doe_ext.dmoe import DMoE, Document
from doe_ext.dmoe.data import load
from doe_ext.dmoe.evaluate import Harness, Variant, evaluate


def dev_split(knowledge: str, limit: int | None = None) -> tuple[list[Document], list[dict]]:
    """The first ``limit`` (all by default) dev questions of ``knowledge`` and the documents they ask about."""
    docs, dev = load(knowledge, "dev")
    dev = dev[:limit]
    wanted = {q["doc_id"] for q in dev}
    return [Document(d["id"], d["text"], d.get("title")) for d in docs if d["id"] in wanted], dev


def dmoe_and_oracle(base, bank, dev: list[dict], site=None) -> tuple[dict, dict[str, DMoE]]:
    """``dev`` answered by DMoE and by the oracle router over ``bank`` (experts at ``site``, the last MLP
    by default): the evaluation's results by method, and the two DMoE objects (their counters)."""
    models = {"dmoe": DMoE(base, bank, site=site), "oracle top-1": DMoE(base, bank, compose="top1", top_k=1, site=site)}
    variants = [Variant(name, m, oracle=name != "dmoe") for name, m in models.items()]
    return evaluate(Harness(base, bank), dev, variants, progress=False), models
