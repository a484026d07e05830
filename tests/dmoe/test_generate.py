"""DMoE generation against slower, obviously correct references."""
import copy
import math

import pytest
import torch

from dmoe_testing import DOCS, QUESTIONS, random_bank
from doe_ext.dmoe import BankError, DMoE, ExpertBank, ExpertSite, Recipe, load_base, merged_state, token_entropy
from doe_ext.dmoe.experts import set_linear_weight
from doe_ext.dmoe.routing import DEFAULT_COMPOSE, DEFAULT_TEMPERATURE


def plain_merge(theta, experts, weights, scale):
    """``theta + sum_e weights[e] * scale * B_e @ A_e``, one expert at a time in plain torch."""
    out = {n: w.detach().clone() for n, w in theta.items()}
    for e, w in zip(experts, weights):
        for n in out:
            out[n] += w * scale * e[f"{n}.lora_b"] @ e[f"{n}.lora_a"]
    return out


def reference_compose(hits, mode, temperature):
    """The composition weights, written out per mode."""
    if not hits:
        return [], []
    if mode == "top1":
        return hits[:1], [1.0]
    scores = torch.tensor([s for _, s in hits], dtype=torch.float64)
    w = {"sum": torch.ones(len(hits)), "mean": torch.full((len(hits),), 1 / len(hits)),
         "score": torch.softmax(scores / temperature, 0)}[mode]
    return hits, w.tolist()


def reference_generate(base, bank, prompt, max_new_tokens, tau, top_k, query_tokens=128, active=(), stop=(),
                       route_text=None, compose=DEFAULT_COMPOSE, temperature=DEFAULT_TEMPERATURE, reader=None):
    """No KV cache, experts merged into the weights (theta + sum of weighted deltas): the whole model
    re-runs on the whole sequence at every step, and again after every trigger. ``active``: the
    weighted set to start with; ``stop``: tokens that end the sequence besides EOS; ``route_text``:
    what queries start with (the prompt by default); ``reader``: a knowledge reader whose delta, at
    its own ``alpha / rank``, is merged whenever any expert is."""
    model = copy.deepcopy(base.model)
    site = ExpertSite(model)
    theta = {n: w.detach().clone() for n, w in site.weights().items()}
    tok = base.tokenizer
    eos = tok.eos_token_id

    def logits_with(ids, active):
        merged = plain_merge(theta, [bank.get(e) for e, _ in active], [w for _, w in active], bank.lora.scale)
        if reader is not None and active:
            merged = plain_merge(merged, [reader.tensors], [1.0], reader.lora.scale)
        for n, w in merged.items():
            set_linear_weight(site.modules()[n], w)
        return model(torch.tensor([ids])).logits[0, -1]

    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    seq = list(ids) if route_text is None else tok(route_text, add_special_tokens=False)["input_ids"]
    active, tokens, triggers = list(active), [], []
    with torch.no_grad():
        for t in range(max_new_tokens):
            logits = logits_with(ids, active)
            ent = token_entropy(logits).item()
            if ent > tau:
                hits, weights = reference_compose(bank.search(tok.decode(seq[-query_tokens:]), top_k), compose,
                                                  temperature)
                active = [(e, w) for (e, _), w in zip(hits, weights)]
                triggers.append((t, [e for e, _ in active], weights))
                logits = logits_with(ids, active)
            nxt = int(logits.argmax())
            tokens.append(nxt)
            ids.append(nxt)
            seq.append(nxt)
            if nxt == eos or nxt in stop:
                break
    return tokens, triggers


def split_tau(dmoe, n):
    """A threshold between the entropies a tau = 0 run sees, in the widest gap of their middle half, so
    that some steps trigger and some do not, and float noise cannot move a step across it."""
    e = sorted(x for q in QUESTIONS for x in dmoe.generate(q, max_new_tokens=n, tau=0.0)[0].entropies)
    i = max(range(len(e) // 4, 3 * len(e) // 4), key=lambda j: e[j + 1] - e[j])
    assert e[i + 1] - e[i] > 1e-4
    return (e[i] + e[i + 1]) / 2


@pytest.fixture
def bank(base, tmp_path):
    return random_bank(base, tmp_path / "bank")


def test_tau_inf_is_the_base_model(base, bank):
    dmoe = DMoE(base, bank, tau=math.inf)
    for q in QUESTIONS[:2]:
        enc = base.tokenizer(q, return_tensors="pt", add_special_tokens=False)
        ref = base.model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=base.tokenizer.pad_token_id)
        got = dmoe.generate(q, max_new_tokens=12)[0]
        assert got.tokens == ref[0, enc["input_ids"].shape[1]:].tolist()
        assert got.triggers == []


@pytest.mark.parametrize("compose, temperature", [("sum", 1.0), ("mean", 1.0), ("score", 1.0), ("score", 0.3),
                                                  ("top1", 1.0)])
@pytest.mark.parametrize("tau", [0.0, "mid"])
def test_equals_no_cache_merged_reference(base, bank, tau, compose, temperature):
    """Every composition: the cached, batched, re-predicting DMoE == the no-cache merged-weights reference."""
    dmoe = DMoE(base, bank, top_k=3, compose=compose, temperature=temperature)
    if tau == "mid":
        tau = split_tau(dmoe, 10)
    n_trig = 0
    for q in QUESTIONS:
        got = dmoe.generate(q, max_new_tokens=10, tau=tau)[0]
        ref_tokens, ref_triggers = reference_generate(base, bank, q, 10, tau, 3, compose=compose,
                                                      temperature=temperature)
        assert got.tokens == ref_tokens
        assert [(t.position, t.experts) for t in got.triggers] == [(p, e) for p, e, _ in ref_triggers]
        for t, (_, _, w) in zip(got.triggers, ref_triggers):
            assert t.weights == pytest.approx(w, rel=1e-6)
        n_trig += len(got.triggers)
    assert n_trig > 0


def test_compositions_differ(base, bank):
    """The modes are not one another in disguise: on the same triggers, each gives its own weights and
    (sum against the normalised ones) its own tokens."""
    got = {m: DMoE(base, bank, top_k=3, compose=m, temperature=0.5).generate(QUESTIONS, max_new_tokens=6, tau=0.0)
           for m in ("sum", "mean", "score", "top1")}
    first = {m: g[0].triggers[0] for m, g in got.items()}
    assert len(first["sum"].experts) == 3 and first["top1"].experts == first["sum"].experts[:1]
    assert first["sum"].weights == [1.0] * 3 and first["mean"].weights == pytest.approx([1 / 3] * 3)
    assert sum(first["score"].weights) == pytest.approx(1.0) and first["score"].weights != first["mean"].weights
    assert [g.tokens for g in got["sum"]] != [g.tokens for g in got["mean"]]


def test_merged_state_is_the_plain_merge(base, bank):
    experts = [bank.get(e) for e in ("otter", "fugue")]
    got = merged_state(base.site, experts, [0.7, -1.5])
    want = plain_merge(base.site.weights(), experts, [0.7, -1.5], 1.0)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-5)
    assert all(torch.equal(merged_state(base.site, [], [])[n], w) for n, w in base.site.weights().items())


@pytest.mark.parametrize("bad, message", [(dict(compose="max"), "`compose` must be one of"),
                                          (dict(compose="score", temperature=0.0), "`temperature` must be > 0")])
def test_bad_composition_is_named(base, bank, bad, message):
    with pytest.raises(ValueError, match=message):
        DMoE(base, bank, **bad)


def test_experts_change_the_output(base, bank):
    """The experts are live: with them the tokens differ from the base model's (else the reference test
    above would compare two base runs)."""
    dmoe = DMoE(base, bank)
    with_experts = [dmoe.generate(q, max_new_tokens=10, tau=0.0)[0].tokens for q in QUESTIONS]
    without = [dmoe.generate(q, max_new_tokens=10, tau=math.inf)[0].tokens for q in QUESTIONS]
    assert with_experts != without


@pytest.mark.parametrize("tau", [0.0, "mid"])
def test_batch_equals_each_alone(base, bank, tau):
    dmoe = DMoE(base, bank, top_k=2)
    if tau == "mid":
        tau = split_tau(dmoe, 8)
    batch = dmoe.generate(QUESTIONS, max_new_tokens=8, tau=tau)
    sets = set()
    for q, g in zip(QUESTIONS, batch):
        alone = dmoe.generate(q, max_new_tokens=8, tau=tau)[0]
        assert g.tokens == alone.tokens
        assert [(t.position, t.experts) for t in g.triggers] == [(t.position, t.experts) for t in alone.triggers]
        assert g.entropies == pytest.approx(alone.entropies, abs=1e-4)
        sets.update(tuple(t.experts) for t in g.triggers)
    if tau == 0.0:
        assert len(sets) > 1  # a mixed batch: sequences ran with different expert sets


def test_trace_and_dict(base, bank):
    g = DMoE(base, bank).generate(QUESTIONS[0], max_new_tokens=5, tau=0.0)[0]
    d = g.to_dict()
    assert set(d) == {"answer", "triggers"} and d["answer"] == g.text
    assert [t["position"] for t in d["triggers"]] == list(range(len(g.tokens)))
    assert all(len(t["experts"]) == 3 and t["entropy"] > 0 for t in d["triggers"])
    assert "<table>" in g._repr_html_()


def test_empty_bank_is_refused(base, tmp_path):
    bank = ExpertBank(tmp_path / "empty", create=True, fingerprint=base.fingerprint, recipe=Recipe())
    with pytest.raises(BankError, match="has no experts"):
        DMoE(base, bank)


def test_bank_for_another_base_is_refused(base, bank, tmp_path):
    other = copy.deepcopy(base.model)
    with torch.no_grad():
        other.get_output_embeddings().weight.add_(1e-3)  # the head is part of what experts depend on
    other_base = load_base(other, tokenizer=base.tokenizer)
    assert other_base.fingerprint != base.fingerprint
    with pytest.raises(BankError, match="fingerprint"):
        DMoE(other_base, bank)


def test_prompt_longer_than_the_context(base, bank):
    long = " ".join(DOCS[0]["text"] for _ in range(60))
    with pytest.raises(ValueError, match="exceeds the model's context of 1024 positions"):
        DMoE(base, bank).generate(long, max_new_tokens=8)


def test_query_is_the_prefix_before_the_position(base, bank):
    seen = []

    def router(query, k):
        seen.append(query)
        return bank.search(query, k)

    dmoe = DMoE(base, bank, router=router, query_tokens=5)
    g = dmoe.generate(QUESTIONS[0], max_new_tokens=3, tau=0.0)[0]
    ids = base.tokenizer(QUESTIONS[0], add_special_tokens=False)["input_ids"]
    assert seen == [base.tokenizer.decode((ids + g.tokens[:t])[-5:], skip_special_tokens=True) for t in range(3)]
    seen.clear()
    g = dmoe.generate("Question: " + QUESTIONS[1] + "\nAnswer:", max_new_tokens=2, tau=0.0, route_texts=["basalt"])[0]
    ids = base.tokenizer("basalt", add_special_tokens=False)["input_ids"]
    assert seen == [base.tokenizer.decode((ids + g.tokens[:t])[-5:], skip_special_tokens=True) for t in range(2)]
    with pytest.raises(ValueError, match="2 `route_texts` for 1 prompts"):
        dmoe.generate("x", route_texts=["a", "b"])


@pytest.mark.parametrize("tau", [0.0, "mid", math.inf])
def test_shared_prefix_equals_unshared(base, bank, tau):
    """Prompts with a common few-shot prefix: the prefix run once (its cache repeated) == every prompt
    run whole, in a batch and alone, with triggers and with PRAG-style sets from the first position."""
    check_shared_prefix(base, bank, tau)


PREFIX = "".join(f"Question: {q}\nAnswer: {d['text'][:20]}\n\n" for q, d in zip(QUESTIONS, DOCS))


def outgrow_window(base):
    """The prefix tests' shared prefix fills the sliding window several times over, and their suffixes
    differ in length (so a batch pads them)."""
    assert len(base.tokenizer(PREFIX)["input_ids"]) > 4 * base.model.config.sliding_window
    assert len({len(base.tokenizer(f"Question: {q}\nAnswer:")["input_ids"]) for q in QUESTIONS}) > 1


@pytest.mark.parametrize("tau", [0.0, "mid", math.inf])
def test_shared_prefix_with_a_sliding_window(sliding_base, tmp_path, tau):
    """Gemma 3's sliding-window layers: padding after the shared prefix would take slots of the window."""
    outgrow_window(sliding_base)
    check_shared_prefix(sliding_base, random_bank(sliding_base, tmp_path / "bank"), tau)


def check_shared_prefix(base, bank, tau):
    dmoe = DMoE(base, bank, top_k=2)
    if tau == "mid":
        tau = split_tau(dmoe, 8)
    prefix = PREFIX
    prompts = [prefix + f"Question: {q}\nAnswer:" for q in QUESTIONS]
    n = len(base.tokenizer(prefix, add_special_tokens=False)["input_ids"])
    assert n > 16
    experts = [[(DOCS[i]["id"], 1.0)] for i in range(len(prompts))] if tau == math.inf else None
    shared = dmoe.generate(prompts, max_new_tokens=8, tau=tau, experts=experts)
    whole = dmoe.generate(prompts, max_new_tokens=8, tau=tau, experts=experts, share_prefix=0)
    for i, (s, w) in enumerate(zip(shared, whole)):
        alone = dmoe.generate(prompts[i], max_new_tokens=8, tau=tau, experts=experts and [experts[i]],
                              share_prefix=0)[0]
        for other in (w, alone):
            assert s.tokens == other.tokens
            assert [(t.position, t.experts) for t in s.triggers] == [(t.position, t.experts) for t in other.triggers]
            assert s.entropies == pytest.approx(other.entropies, abs=1e-4)


def test_kept_prefix_serves_the_next_call(base, bank):
    """A call keeps its shared prefix's cache; the next call, whose prompts share only part of it (and
    one prompt alone), reuses that part and answers as a fresh model without sharing does."""
    check_kept_prefix(base, bank)


def test_kept_prefix_with_a_sliding_window(sliding_base, tmp_path):
    """A full sliding window cannot be cut back to the common part (transformers refuses): it runs again."""
    outgrow_window(sliding_base)
    check_kept_prefix(sliding_base, random_bank(sliding_base, tmp_path / "bank"))


def check_kept_prefix(base, bank):
    dmoe = DMoE(base, bank, tau=math.inf)
    prefix = PREFIX
    n = len(base.tokenizer(prefix, add_special_tokens=False)["input_ids"])
    first = [prefix + "Question: Which rock is basalt?\nAnswer:", prefix + "Question: Which rock is granite?\nAnswer:"]
    dmoe.generate(first, max_new_tokens=3)
    assert len(dmoe._kept_prefix[0]) > n  # the first batch shared "Question: Which rock is" too
    for prompts in ([prefix + f"Question: {q}\nAnswer:" for q in QUESTIONS], [prefix + "Question: " + QUESTIONS[0]]):
        got = dmoe.generate(prompts, max_new_tokens=6)
        want = DMoE(base, bank, tau=math.inf).generate(prompts, max_new_tokens=6, share_prefix=0)
        for g, w in zip(got, want):
            assert g.tokens == w.tokens
            assert g.entropies == pytest.approx(w.entropies, abs=1e-4)


def test_stop_tokens_end_a_sequence_and_stay_in_it(base, bank):
    dmoe = DMoE(base, bank, tau=math.inf)
    free = dmoe.generate(QUESTIONS, max_new_tokens=8)
    stop = {free[0].tokens[2], free[1].tokens[0]}
    got = dmoe.generate(QUESTIONS, max_new_tokens=8, stop_tokens=stop)
    for f, g in zip(free, got):
        cut = next((i + 1 for i, t in enumerate(f.tokens) if t in stop), len(f.tokens))
        assert g.tokens == f.tokens[:cut]
    assert len(got[0].tokens) <= 3 and len(got[1].tokens) == 1


def test_without_a_bank_it_is_the_base_model(base):
    """``DMoE(base, None)``: the base alone, with the batched, prefix-sharing decoding (the distillation
    teacher uses it): equal to HF's greedy generate one prompt at a time; experts and triggers refused."""
    dmoe = DMoE(base, None, tau=math.inf)
    prefix = "".join(f"Passage: {d['text']}\n" for d in DOCS[:2])
    prompts = [prefix + f"Question: {q}\nAnswer:" for q in QUESTIONS]
    for p, g in zip(prompts, dmoe.generate(prompts, max_new_tokens=6)):
        enc = base.tokenizer(p, return_tensors="pt")
        ref = base.model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=base.tokenizer.pad_token_id)
        assert g.tokens == ref[0, enc["input_ids"].shape[1]:].tolist()
    with pytest.raises(ValueError, match="without a bank there are no experts: `tau` must be inf"):
        dmoe.generate("x", tau=2.0)
    with pytest.raises(ValueError, match="without a bank there are no experts"):
        dmoe.generate("x", experts=[[("otter", 1.0)]])


@pytest.mark.parametrize("site", ["last layer", "every layer"])
def test_a_trigger_to_the_active_set_keeps_its_logits(base, bank, tmp_path, site):
    """A trigger that routes to the set already active does not re-predict (its logits were computed with
    that set): the outputs equal those of re-predicting at every trigger, and fewer rows re-predict."""
    site = ExpertSite(base.model, depth=1.0) if site == "every layer" else None
    if site is not None:  # a deep site: a re-prediction re-runs the rows and replaces their cache
        from test_deep import deep_bank
        bank = deep_bank(base, site, tmp_path / "deep")
    fast, slow = (DMoE(base, bank, tau=0.0, top_k=2, site=site) for _ in range(2))
    slow.repredict_same_set = True
    a, b = fast.generate(QUESTIONS, 8), slow.generate(QUESTIONS, 8)
    for x, y in zip(a, b):
        assert x.tokens == y.tokens
        assert [(t.position, t.experts, t.weights) for t in x.triggers] == [(t.position, t.experts, t.weights)
                                                                             for t in y.triggers]
        # (a deep site's re-run rows leave a cache that differs in rounding from the one they replace)
        assert [t.entropy for t in x.triggers] == pytest.approx([t.entropy for t in y.triggers], abs=1e-5)
        assert x.entropies == pytest.approx(y.entropies, abs=1e-5)
        assert x.token_probs == pytest.approx(y.token_probs, abs=1e-5)
    triggers = sum(len(x.triggers) for x in a)
    assert slow.repredicted_rows == triggers and 0 < fast.repredicted_rows < triggers
    if site is not None:
        assert 0 < fast.recomputed_tokens < slow.recomputed_tokens
        site.detach()
