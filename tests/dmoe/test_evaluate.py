"""The evaluation harness: every built method on a tiny model and bank, against references."""
import json
import math

import pytest
import torch

from dmoe_testing import DOCS, QUESTIONS, random_bank, write_docs
from doe_ext.cli import main
from doe_ext.dmoe import DMoE, ExpertBank, load_base, qa_prompt
from doe_ext.dmoe.augment import fewshot_prompt
from doe_ext.dmoe.build import sft_bank
from doe_ext.dmoe.evaluate import (METHODS, Harness, Sample, Variant, _first_sentence, check_methods, evaluate,
                                   markdown, read_questions, read_shots, summarize)
from doe_ext.dmoe.metrics import cut_answer
from test_generate import reference_compose, reference_generate

QA = [{"question": q, "answers": [a], "doc_id": d} for q, a, d in zip(
    QUESTIONS, ["shellfish", "basalt", "a piece of music", "a civil wrong"], ["otter", "basalt", "fugue", "tort"])]
QA.append({"question": "Is a sextant used at sea?", "answers": ["yes"], "doc_id": "sextant"})


@pytest.fixture
def bank(base, tmp_path):
    return random_bank(base, tmp_path / "bank")


SHOTS = [("What is a tort?", "a civil wrong", DOCS[3]["text"]), ("Which rock is formed from lava?", "basalt",
                                                                   DOCS[1]["text"])]


@pytest.mark.parametrize("shots, compose", [((), "sum"), (SHOTS, "score")], ids=["chat-sum", "fewshot-score"])
def test_every_method_against_its_reference(base, bank, shots, compose):
    sft = sft_bank(base, bank)
    h = Harness(base, bank, shots=shots, top_k=2, tau=0.0, max_new_tokens=6, batch_size=2, compose=compose,
                temperature=0.5, sft=sft)
    res = evaluate(h, QA, METHODS, progress=False)
    assert list(res) == list(METHODS) and all(len(v) == len(QA) for v in res.values())
    tok = base.tokenizer
    prompt = (lambda q, p: fewshot_prompt(q, p, shots)) if shots else (lambda q, p: qa_prompt(tok, q, p))
    for i, q in enumerate(QA):
        routed = bank.route(q["question"], 2)
        assert res["rag"][i].passages == res["prag"][i].passages == routed
        assert res["gold"][i].passages == [q["doc_id"]] and res["base"][i].passages == []
        hits, weights = reference_compose(bank.search(q["question"], 2), compose, 0.5)
        prag = [(e, w) for (e, _), w in zip(hits, weights)]
        for m, active in (("base", ()), ("gold", ()), ("rag", ()), ("prag", prag)):
            ids = {"base": [], "gold": [q["doc_id"]], "rag": routed, "prag": routed}[m]
            tokens, triggers = reference_generate(base, bank, prompt(q["question"], [bank.row(d).text for d in ids] or None),
                                                  6, math.inf, 2, active=active, stop=h.stop)
            want = cut_answer(tok.decode([t for t in tokens if t != tok.eos_token_id], skip_special_tokens=True).strip())
            assert res[m][i].prediction == want, m
            assert res[m][i].triggers == 0 and not triggers
        tokens, triggers = reference_generate(base, bank, prompt(q["question"], None), 6, 0.0, 2, stop=h.stop,
                                              route_text=q["question"], compose=compose, temperature=0.5)
        want = cut_answer(tok.decode([t for t in tokens if t != tok.eos_token_id], skip_special_tokens=True).strip())
        assert res["dmoe"][i].prediction == want and res["dmoe"][i].triggers == len(triggers) > 0
        assert res["dmoe"][i].entropy > 0 and res["base"][i].entropy == pytest.approx(res["dmoe"][i].entropy, abs=1e-4)
        for m in METHODS:
            s = res[m][i]
            assert 0 <= s.em <= s.f1 <= 1
            assert s.latency_s > 0 and (s.peak_rss_mib is None or s.peak_rss_mib > 10)
    for m in ("base", "gold", "rag"):  # batched shortest prompt first; results in the questions' order (above)
        idx = h.order(m, QA)
        sizes = [len(tok(prompt(QA[i]["question"], [bank.row(d).text for d in res[m][i].passages] or None),
                         add_special_tokens=False)["input_ids"]) for i in idx]
        assert sorted(idx) == list(range(len(QA))) and sizes == sorted(sizes) and len(set(sizes)) > 1
    assert [s.yes_no for s in res["base"]] == [False] * 4 + [True]
    assert res["rag"][4].correct_yes_no in (0.0, 1.0)
    one = evaluate(Harness(base, bank, shots=shots, top_k=2, tau=0.0, max_new_tokens=6, batch_size=1, compose=compose,
                           temperature=0.5, sft=sft), QA, METHODS, progress=False)
    for m in METHODS:  # batches (and their shared prompt prefix) answer as one question at a time does
        assert [s.prediction for s in one[m]] == [s.prediction for s in res[m]], m
        assert [s.passages for s in one[m]] == [s.passages for s in res[m]], m


def test_flare_retrieves_only_on_uncertain_sentences(base, bank):
    qs = [QA[1]["question"], QA[2]["question"]]
    h = Harness(base, bank, top_k=2, max_new_tokens=12, flare_theta=0.0)
    for _, text, retrievals, ids in h._flare(qs):
        assert retrievals == 0 and ids == [] and text
    h = Harness(base, bank, top_k=2, max_new_tokens=12, flare_theta=1.01, flare_lookahead=4)
    for _, text, retrievals, ids in h._flare(qs):
        assert retrievals >= 1 and set(ids) <= set(bank.ids()) and ids  # every sentence retrieves at theta > 1
    # one question alone == in the batch
    assert h._flare(qs[1:]) == h._flare(qs)[1:]


def test_first_sentence(base):
    tok = base.tokenizer
    ids = tok("see github.com now. Then more", add_special_tokens=False)["input_ids"]
    n = _first_sentence(tok, ids, set())
    assert tok.decode(ids[:n]).rstrip() == "see github.com now."
    assert _first_sentence(tok, ids, {ids[1]}) == 2 and _first_sentence(tok, ids[:3], set()) == 3


def test_oracle_variant_routes_to_the_question_document(base, bank):
    h = Harness(base, bank, top_k=2, max_new_tokens=4)
    v = Variant("oracle", DMoE(base, bank, tau=0.0), oracle=True)
    res = evaluate(h, QA, [v], progress=False)["oracle"]
    assert [s.passages for s in res] == [[q["doc_id"]] for q in QA]
    with pytest.raises(ValueError, match="'oracle' needs a `doc_id`"):
        evaluate(h, [{"question": "q", "answers": ["a"]}], [v], progress=False)


def test_prag_experts_matter(base, bank):
    """PRAG's experts are live: the same prompt with and without them differs."""
    res = evaluate(Harness(base, bank, max_new_tokens=8), QA, ["rag", "prag"], progress=False)
    assert [s.prediction for s in res["rag"]] != [s.prediction for s in res["prag"]]


def test_summary_and_markdown_known_values():
    mk = lambda em, f1, yn=None: Sample("q", ["a"], "p", em, f1, 0.5, 100.0, 1, [], yn is not None, yn)  # noqa: E731
    summary = summarize({"rag": [mk(1, 1), mk(0, 0.5), mk(1, 1), mk(0, 0, 1.0)]})
    s = summary["rag"]
    assert s["n"] == 4 and s["em"][0] == 0.5 and s["f1"][0] == pytest.approx(0.625)
    assert s["em"][1] <= 0.5 <= s["em"][2] and s["yes_no_accuracy"] == (1.0, 1.0, 1.0) and s["n_yes_no"] == 1
    assert s["latency_s"] == 0.5 and s["peak_rss_mib"] == 100.0 and s["triggers"] == 1
    md = markdown(summary)
    assert md.splitlines()[0].startswith("| method | n | EM [95% CI]") and "| rag | 4 | 0.500 [" in md


def test_sft_is_one_adapter_over_the_corpus(base, bank, capsys):
    from doe_ext.dmoe import Augmentation, Document, Recipe, train_experts
    from doe_ext.dmoe.distill import instances_for
    from doe_ext.dmoe.train import train_adapter

    sft = sft_bank(base, bank)
    assert sft.ids() == ["sft"] and sft.path == bank.path / "sft" and len(bank) == len(DOCS)
    checksum = sft.row("sft").checksum
    assert sft_bank(base, bank).row("sft").checksum == checksum  # kept, not trained again
    # one document a step: an expert of that document
    one = train_adapter(base, [(Document("x", DOCS[0]["text"]), Augmentation())], Recipe(), docs_per_step=1)
    ref = train_experts(base, [(Document("sft", DOCS[0]["text"]), Augmentation())], Recipe())[0]
    for k in ref.tensors:
        assert torch.equal(one.tensors[k], ref.tensors[k])
    # k documents a step: one expert on every document's instances, k times the recipe's batch a step
    items = [(Document(d["id"], d["text"]), Augmentation()) for d in DOCS]
    recipe = Recipe(batch_size=1, epochs=2)
    insts = [i for doc in instances_for(base, items, recipe) for i in doc]
    assert len(insts) > 2  # else the batch sizes below could not differ
    two = train_adapter(base, items, recipe, docs_per_step=2)
    ref = train_experts(base, [(Document("sft", ""), Augmentation())], recipe.replace(batch_size=2),
                        instances=[insts])[0]
    capsys.readouterr()
    per_doc = train_adapter(base, items, recipe, docs_per_step=1, progress=True)
    steps = recipe.epochs * len(insts)  # one instance a step: the bar counts every optimizer step
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("train sft: 100%") and f"| {steps}/{steps} [" in last
    for k in ref.tensors:
        assert torch.equal(two.tensors[k], ref.tensors[k])
    assert any(not torch.equal(two.tensors[k], per_doc.tensors[k]) for k in ref.tensors)
    with pytest.raises(ValueError, match="train_adapter: `docs_per_step` must be >= 1, got 0"):
        train_adapter(base, items, recipe, docs_per_step=0)
    bank.remove(["tort"])
    assert sft_bank(base, bank).row("sft").checksum != checksum  # the corpus changed
    res = evaluate(Harness(base, bank, max_new_tokens=6, sft=sft_bank(base, bank)), QA[:2], ["base", "sft"],
                   progress=False)
    assert [s.passages for s in res["sft"]] == [["sft"], ["sft"]]
    with pytest.raises(ValueError, match=r"the method 'sft' needs the SFT-LoRA adapter: Harness\(\.\.\., "
                                         r"sft=doe_ext\.dmoe\.build\.sft_bank\(base, bank\)\)"):
        evaluate(Harness(base, bank, max_new_tokens=6), QA[:2], ["base", "sft"], progress=False)  # the harness never trains


def test_method_and_question_errors(base, bank, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'rgb'"):
        check_methods(["rgb"])
    with pytest.raises(ValueError, match="`batch_size` must be >= 1, got 0"):
        Harness(base, bank, batch_size=0)
    shots = tmp_path / "shots.jsonl"
    shots.write_text(json.dumps({"question": "q", "answers": ["a"], "doc_id": "nope"}) + "\n")
    with pytest.raises(ValueError, match="shots.jsonl:1: a demonstration needs a `passage` or the `doc_id`"):
        read_shots(shots, bank)
    shots.write_text(json.dumps({"question": "q", "answers": ["a"], "doc_id": "otter"}) + "\n"
                     + json.dumps({"question": "r", "answers": ["b"], "passage": "p"}) + "\n")
    assert read_shots(shots, bank) == [("q", "a", DOCS[0]["text"]), ("r", "b", "p")]
    p = tmp_path / "qa.jsonl"
    p.write_text(json.dumps(QA[0]) + "\n" + json.dumps({"question": "q", "answers": []}) + "\n")
    with pytest.raises(ValueError, match="qa.jsonl:2: expected"):
        read_questions(p)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_questions(tmp_path / "none.jsonl")


def test_eval_cli(llama_dir, tmp_path, capsys):
    docs = write_docs(tmp_path / "docs.jsonl", DOCS)
    assert main(["dmoe", "build", str(docs), "--out", str(tmp_path / "bank"), "--base", str(llama_dir),
                 "--recipe", "paper", "--augment", "none", "--no-progress"]) == 0
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(q) + "\n" for q in QA))
    capsys.readouterr()
    code = main(["dmoe", "eval", str(tmp_path / "bank"), str(qa), "--methods", "base,rag,flare,dmoe,sft", "--out",
                 str(tmp_path / "out"), "--max-new-tokens", "4", "--limit", "3", "--sft-docs-per-step", "2",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "| base | 3 |" in out and "| dmoe | 3 |" in out and "| sft | 3 |" in out
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert set(saved["summary"]) == {"base", "rag", "flare", "dmoe", "sft"} and len(saved["samples"]["rag"]) == 3
    with ExpertBank(tmp_path / "bank") as bank:  # the CLI trained it with 2: asking for 2 keeps it, for 1 retrains
        base = load_base(str(llama_dir))
        checksum = ExpertBank(tmp_path / "bank" / "sft").row("sft").checksum
        assert sft_bank(base, bank, docs_per_step=2).row("sft").checksum == checksum
        assert sft_bank(base, bank, docs_per_step=1).row("sft").checksum != checksum
    with pytest.raises(SystemExit) as e:  # refused while parsing (tests/dmoe/test_cli.py has every rule)
        main(["dmoe", "eval", str(tmp_path / "bank"), str(qa), "--sft-docs-per-step", "0"])
    assert e.value.code == 2 and "argument --sft-docs-per-step: must be >= 1, got 0" in capsys.readouterr().err
    assert (tmp_path / "out" / "eval.md").read_text() == out.split("wrote")[0]
    code = main(["dmoe", "eval", str(tmp_path / "bank"), str(qa), "--methods", "base,rgb"])
    assert code == 2 and "unknown method 'rgb'" in capsys.readouterr().err


def distill_bank(base, path):
    """The random bank's experts under the default (distill) recipe: asked after its demonstrations."""
    from doe_ext.dmoe.recipe import DEFAULT

    plain = random_bank(base, path.parent / (path.name + "-plain"))
    bank = ExpertBank(path, create=True, fingerprint=base.fingerprint, base_name=base.name, recipe=DEFAULT)
    for r in plain.rows():
        bank.add(r.id, plain.get(r.id), r.text, r.surrogate)
    return bank


def test_experts_are_asked_in_the_layout_they_were_trained_in(base, bank, tmp_path):
    """Without shots, the methods with experts use their recipe's layout (distill: the distillation
    demonstrations; next-token: the chat template) and the others the chat template; given shots, every
    method uses them."""
    from doe_ext.dmoe.augment import SHOTS as DEMOS, expert_shots

    dist = distill_bank(base, tmp_path / "distill")
    assert expert_shots(dist.recipe) == DEMOS and expert_shots(bank.recipe) == ()
    q, ps = "What is basalt?", [DOCS[1]["text"]]
    h = Harness(base, dist)
    assert h.prompt(q, experts=True) == fewshot_prompt(q, None, DEMOS)
    assert h.prompt(q, ps, experts=True) == fewshot_prompt(q, ps, DEMOS)
    assert h.prompt(q, ps) == qa_prompt(base.tokenizer, q, ps)
    assert Harness(base, bank).prompt(q, experts=True) == qa_prompt(base.tokenizer, q)
    given = Harness(base, dist, shots=SHOTS)
    assert given.prompt(q) == given.prompt(q, experts=True) == fewshot_prompt(q, None, SHOTS)
    got = evaluate(h, QA[:2], ["dmoe", "rag"], progress=False)
    dm = DMoE(base, dist)
    want = dm.generate([fewshot_prompt(x["question"], None, DEMOS) for x in QA[:2]], h.max_new_tokens,
                       stop_tokens=h.stop, route_texts=[x["question"] for x in QA[:2]])
    assert [s.prediction for s in got["dmoe"]] == [cut_answer(g.text) for g in want]


def test_ask_uses_the_experts_layout_and_stops_at_a_line_break(base, tmp_path):
    from doe_ext.dmoe.augment import SHOTS as DEMOS
    from doe_ext.dmoe.model import line_break_tokens

    dm = DMoE(base, distill_bank(base, tmp_path / "d"))
    got = dm.ask("What is basalt?", max_new_tokens=12, tau=0.0)
    want = dm.generate(fewshot_prompt("What is basalt?", None, DEMOS), 12, tau=0.0, route_texts=["What is basalt?"],
                       stop_tokens=line_break_tokens(base.tokenizer))[0]
    assert got.tokens == want.tokens and got.triggers == want.triggers
    assert "\n" not in got.text
