"""The DMoE ablations' parts on a tiny model and bank (the whole tables run in the demo test)."""
import math

import pytest
import torch

from dmoe_testing import DOCS, random_bank
from experiments import dmoe_ablations as ablations
from doe_ext.dmoe.evaluate import Harness, Sample, Variant, evaluate
from test_evaluate import QA


@pytest.fixture
def harness(base, tmp_path):
    return Harness(base, random_bank(base, tmp_path / "bank"), top_k=2, max_new_tokens=5)


def sample(entropy, em, triggers=0, steps=1):
    return Sample("q", ["a"], "p", em, em, 0.1, None, triggers, [], entropy=entropy, steps=steps)


def test_table5_bins_are_equal_count_and_sorted():
    s = [sample(e, float(e < 2)) for e in (4.0, 0.5, 3.0, 1.0, 2.5, 1.5)]
    bins = ablations.table5_bins(s + [sample(None, 1.0)], bins=3)
    assert [(b["tu_low"], b["tu_high"], b["n"]) for b in bins] == [(0.5, 1.0, 2), (1.5, 2.5, 2), (3.0, 4.0, 2)]
    assert [b["em"][0] for b in bins] == [1.0, 0.5, 0.0]


def test_trigger_rate_and_random_trigger():
    assert ablations.trigger_rate([sample(1.0, 0, triggers=3, steps=6), sample(1.0, 0, triggers=1, steps=0)]) == 4 / 7
    fire = ablations.random_trigger(0.25, seed=1)
    hits = torch.cat([fire(torch.zeros(100), t) for t in range(40)]).float().mean().item()
    assert abs(hits - 0.25) < 0.03
    again = ablations.random_trigger(0.25, seed=1)
    assert torch.equal(again(torch.zeros(7), 0), ablations.random_trigger(0.25, seed=1)(torch.zeros(7), 0))


def test_routers(harness):
    ids = harness.bank.ids()
    r = ablations.random_router(ids, seed=0)
    picks = [tuple(i for i, _ in r("anything", 2)) for _ in range(20)]
    assert all(len(set(p)) == 2 and set(p) <= set(ids) for p in picks) and len(set(picks)) > 1
    assert {s for _ in range(5) for _, s in r("x", 2)} == {1.0}
    keep = ["basalt", "tort"]
    sub = ablations.subset_router(harness, keep)
    q = "volcanic rock formed from lava"
    assert harness.bank.route(q, 1) == ["basalt"] and sub(q, 3) == [h for h in harness.bank.search(q, 5) if h[0] in keep]


def test_dense_router_ranks_by_cosine(harness):
    dense = ablations.DenseRouter(harness, batch_size=2)
    assert dense.emb.shape == (len(DOCS), harness.base.model.config.hidden_size)
    torch.testing.assert_close(dense.emb.norm(dim=-1), torch.ones(len(DOCS)))
    q = dense.embed(["lava rock"])[0]
    scores = dense.emb @ q
    want = [harness.bank.ids()[i] for i in scores.argsort(descending=True)[:3].tolist()]
    got = dense("lava rock", 3)
    assert [i for i, _ in got] == want and [s for _, s in got] == pytest.approx(sorted(scores.tolist())[::-1][:3])
    # a document's own text is nearest to its own embedding (padding and batching do not leak)
    assert [dense(d["text"], 1)[0][0] for d in DOCS] == [d["id"] for d in DOCS]


def test_variants_run_through_the_harness(harness):
    full = evaluate(harness, QA, ["dmoe"], progress=False)["dmoe"]
    rows = ablations.table6(harness, QA, full, progress=False)
    assert list(rows) == ["TU + BM25 (DMoE)", "random trigger", "random router", "always trigger", "oracle router"]
    assert all(len(v) == len(QA) for v in rows.values())
    assert all(s.triggers == s.steps for s in rows["always trigger"])  # tau < 0: every step
    assert [s.passages for s in rows["oracle router"] if s.triggers] == [[q["doc_id"]] for q, s in
                                                                          zip(QA, rows["oracle router"]) if s.triggers]
    never = evaluate(harness, QA, [Variant("never", ablations._dmoe(harness, tau=math.inf))], progress=False)["never"]
    base = evaluate(harness, QA, ["base"], progress=False)["base"]
    assert [s.prediction for s in never] == [s.prediction for s in base]


def test_compositions_table(harness):
    rows = ablations.compositions(harness, QA, temperatures=(1.0,), progress=False)
    assert list(rows) == ["sum", "mean", "score (T=1)", "top1", "oracle router"]
    assert all(len(v) == len(QA) for v in rows.values())
    assert all(len(s.passages) <= 1 for s in rows["top1"]) and any(len(s.passages) > 1 for s in rows["sum"])
