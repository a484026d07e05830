"""The evaluation harness: every built method on a tiny model and bank, against references."""
import json
import math

import pytest
import torch

from conftest import DOCS, QUESTIONS, random_bank, write_docs
from doe_ext.cli import main
from doe_ext.dmoe import DMoE, qa_prompt
from doe_ext.dmoe.evaluate import METHODS, Sample, check_methods, evaluate, flare, markdown, read_questions, summarize
from doe_ext.dmoe.metrics import cut_answer
from test_generate import reference_generate

QA = [{"question": q, "answers": [a], "doc_id": d} for q, a, d in zip(
    QUESTIONS, ["shellfish", "basalt", "a piece of music", "a civil wrong"], ["otter", "basalt", "fugue", "tort"])]
QA.append({"question": "Is a sextant used at sea?", "answers": ["yes"], "doc_id": "sextant"})


@pytest.fixture
def bank(base, tmp_path):
    return random_bank(base, tmp_path / "bank")


def test_every_method_against_its_reference(base, bank):
    res = evaluate(base, bank, QA, METHODS, top_k=2, tau=0.0, max_new_tokens=6, progress=False)
    assert list(res) == list(METHODS) and all(len(v) == len(QA) for v in res.values())
    tok = base.tokenizer
    for i, q in enumerate(QA):
        routed = bank.route(q["question"], 2)
        assert res["rag"][i].passages == res["prag"][i].passages == routed
        assert res["gold"][i].passages == [q["doc_id"]] and res["base"][i].passages == []
        for m, active in (("base", ()), ("gold", ()), ("rag", ()), ("prag", routed)):
            ids = {"base": [], "gold": [q["doc_id"]], "rag": routed, "prag": routed}[m]
            prompt = qa_prompt(tok, q["question"], [bank.row(d).text for d in ids] or None)
            tokens, triggers = reference_generate(base, bank, prompt, 6, math.inf, 2, active=active)
            want = cut_answer(tok.decode([t for t in tokens if t != tok.eos_token_id], skip_special_tokens=True).strip())
            assert res[m][i].prediction == want, m
            assert res[m][i].triggers == 0 and not triggers
        g = DMoE(base, bank, tau=0.0, top_k=2).ask(q["question"], max_new_tokens=6)
        assert res["dmoe"][i].prediction == cut_answer(g.text) and res["dmoe"][i].triggers == len(g.triggers) > 0
        for m in METHODS:
            s = res[m][i]
            assert 0 <= s.em <= s.f1 <= 1
            assert s.latency_s > 0 and (s.peak_rss_mib is None or s.peak_rss_mib > 10)
    assert [s.yes_no for s in res["base"]] == [False] * 4 + [True]
    assert res["rag"][4].correct_yes_no in (0.0, 1.0)


def test_flare_retrieves_only_on_uncertain_sentences(base, bank):
    dmoe = DMoE(base, bank)
    q = QA[1]["question"]
    text, retrievals, ids = flare(dmoe, q, top_k=2, max_new_tokens=12, theta=0.0)
    assert retrievals == 0 and ids == [] and text
    text, retrievals, ids = flare(dmoe, q, top_k=2, max_new_tokens=12, theta=1.01, lookahead=4)
    assert retrievals >= 1 and set(ids) <= set(bank.ids()) and ids  # every sentence retrieves at theta > 1
    text_mid, r_mid, _ = flare(dmoe, q, top_k=2, max_new_tokens=12, theta=0.05, lookahead=4)
    assert 0 <= r_mid <= 3


def test_prag_experts_matter(base, bank):
    """PRAG's experts are live: the same prompt with and without them differs."""
    res = evaluate(base, bank, QA, ["rag", "prag"], top_k=3, max_new_tokens=8, progress=False)
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


def test_sft_is_one_adapter_over_the_corpus(base, bank):
    from doe_ext.dmoe import Augmentation, TrainConfig, train_experts
    from doe_ext.dmoe.evaluate import sft_bank
    from doe_ext.dmoe.train import train_adapter

    sft = sft_bank(base, bank)
    assert sft.ids() == ["sft"] and sft.path == bank.path / "sft" and len(bank) == len(DOCS)
    checksum = sft.row("sft").checksum
    assert sft_bank(base, bank).row("sft").checksum == checksum  # kept, not trained again
    one = train_adapter(base, [(DOCS[0]["text"], Augmentation())], TrainConfig())  # one document: an expert
    ref = train_experts(base, [("sft", DOCS[0]["text"], Augmentation())], TrainConfig())[0]
    for k in ref.tensors:
        assert torch.equal(one.tensors[k], ref.tensors[k])
    bank.remove(["tort"])
    assert sft_bank(base, bank).row("sft").checksum != checksum  # the corpus changed
    res = evaluate(base, bank, QA[:2], ["base", "sft"], max_new_tokens=6, progress=False)
    assert [s.passages for s in res["sft"]] == [["sft"], ["sft"]]


def test_method_and_question_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'rgb'"):
        check_methods(["rgb"])
    p = tmp_path / "qa.jsonl"
    p.write_text(json.dumps(QA[0]) + "\n" + json.dumps({"question": "q", "answers": []}) + "\n")
    with pytest.raises(ValueError, match="qa.jsonl:2: expected"):
        read_questions(p)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_questions(tmp_path / "none.jsonl")


def test_eval_cli(llama_dir, tmp_path, capsys):
    docs = write_docs(tmp_path / "docs.jsonl", DOCS)
    assert main(["dmoe", "build", str(docs), "--out", str(tmp_path / "bank"), "--base", str(llama_dir),
                 "--augment", "none", "--no-progress"]) == 0
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(q) + "\n" for q in QA))
    capsys.readouterr()
    code = main(["dmoe", "eval", str(tmp_path / "bank"), str(qa), "--methods", "base,rag,flare,dmoe", "--out",
                 str(tmp_path / "out"), "--max-new-tokens", "4", "--limit", "3", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "| base | 3 |" in out and "| dmoe | 3 |" in out
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert set(saved["summary"]) == {"base", "rag", "flare", "dmoe"} and len(saved["samples"]["rag"]) == 3
    assert (tmp_path / "out" / "eval.md").read_text() == out.split("wrote")[0]
    code = main(["dmoe", "eval", str(tmp_path / "bank"), str(qa), "--methods", "base,rgb"])
    assert code == 2 and "unknown method 'rgb'" in capsys.readouterr().err
