"""The DMoE studies and final tables of experiments/dmoe_report.py (not part of the package): their options,
the studies they keep, and the tables' rules."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]  # `python -m experiments.dmoe_report` runs from the repository root


@pytest.mark.parametrize("study", ["final", "recipes", "ablations"])
def test_report_studies_help_runs(study):
    """The studies the README names (python -m experiments.dmoe_report ...) parse their options."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "experiments.dmoe_report", study, "--help"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: dmoe_report.py") and "--out" in done.stdout
    assert study != "final" or "--rerun" in done.stdout
    assert study != "recipes" or all(o in done.stdout for o in ("--knowledge", "--base", "--only", "--rerun"))


def _study_json(settings: dict) -> dict:
    return {"split": "dev", "questions": 3, "documents": 2, "rows": [], "settings": settings,
            "closed_book": {"em": [0.0, 0.0, 0.0], "f1": [0.1, 0.0, 0.2]},
            "compositions": {"recipe": "tag", "rows": {"top1": {"em": [0.5, 0.0, 1.0], "f1": [0.6, 0.1, 1.0]}}}}


def test_report_recipes_only_epochs_keeps_a_finished_study(tmp_path):
    """`report recipes --only epochs` runs the second dev study alone, into OUT/epochs: the default recipe at
    3e-3 and 1e-2, snapshots after 8, 16 and 24 epochs, compositions on the best oracle's bank. A study
    that finished with those settings is kept (nothing trains, no base loads); --rerun would run it again."""
    import subprocess
    import sys

    from doe_ext.dmoe.recipe import DEFAULT

    settings = {"knowledge": "debian-packages-v1", "base": "smollm2-135m", "limit": None,
                "recipes": {"default": json.loads(json.dumps(DEFAULT.to_dict()))},
                "lrs": {"default": [0.003, 0.01]}, "snapshots": {"default": [8, 16, 24]},
                "compositions": ["mean", "score", "top1"], "temperatures": [1.0, 3.0], "compositions_on": "oracle"}
    (tmp_path / "epochs").mkdir()
    (tmp_path / "epochs" / "recipe_study.json").write_text(json.dumps(_study_json(settings)))
    done = subprocess.run([sys.executable, "-m", "experiments.dmoe_report", "recipes", "--out", str(tmp_path),
                           "--only", "epochs"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "| top1 | 0.500 [0.000, 1.000] | 0.600 [0.100, 1.000] |" in done.stdout
    assert not (tmp_path / "recipe_study.json").exists()  # the first study did not run


def test_kept_study_needs_the_same_settings(tmp_path):
    from experiments.dmoe_report import kept_study

    settings = {"knowledge": "k", "base": "b", "limit": 4, "lrs": {"default": [0.003]}}
    assert kept_study(tmp_path, settings) is None
    (tmp_path / "recipe_study.json").write_text(json.dumps(_study_json(settings)))
    assert kept_study(tmp_path, settings) == _study_json(settings)
    assert kept_study(tmp_path, {**settings, "limit": 5}) is None
    assert kept_study(tmp_path, {**settings, "lrs": {"default": [0.003, 0.01]}}) is None
    (tmp_path / "recipe_study.json").write_text(json.dumps({**_study_json(settings), "settings": None}))
    assert kept_study(tmp_path, settings) is None  # a study written before settings were recorded


def test_recipe_study_refuses_an_unknown_compositions_on_by_name(tmp_path):
    from experiments.dmoe_report import recipe_study

    with pytest.raises(ValueError, match="compositions_on must be 'dmoe' or 'oracle', got 'best'"):
        recipe_study(tmp_path, compositions_on="best")


@pytest.mark.parametrize("knowledge", ["debian-packages-v1", "debian-changelogs-v1"])
def test_recipe_study_reads_the_dev_split_of_its_knowledge_set(knowledge):
    """`report recipes --knowledge NAME`: every choice is made on NAME's dev split, without its yes/no
    questions and without the demonstrations the prompts show."""
    from doe_ext.dmoe.data import load
    from experiments.dmoe_report import dev_questions

    docs, qa = load(knowledge)
    questions, demos, text = dev_questions(None, knowledge)
    dev = [q for q in qa if q["split"] == "dev"]
    assert questions and all(q in dev and not q.get("yes_no") for q in questions)
    shown = {(d[0], d[1]) for d in demos}
    assert not any((q["question"], q["answers"][0]) in shown for q in questions)
    assert set(text) == {d["id"] for d in docs} and all(q["doc_id"] in text for q in questions)
    assert dev_questions(5, knowledge)[0] == questions[:5]


def test_final_table_sample_is_seeded_and_keeps_file_order():
    """`report final --questions N`: the same N questions at every run, in the file's order, none twice."""
    from doe_ext.dmoe.data import sample

    qs = [{"question": f"q{i}"} for i in range(50)]
    a, b = sample(qs, 7), sample(qs, 7)
    assert a == b and len(a) == 7
    idx = [qs.index(q) for q in a]
    assert idx == sorted(set(idx))
    assert sample(qs, 7, seed=1) != a
    assert sample(qs, None) == qs and sample(qs, 80) == qs


def test_final_table_refuses_an_unknown_bank_docs_by_name(tmp_path):
    from experiments.dmoe_report import final_table

    with pytest.raises(ValueError, match="bank_docs must be 'all' or 'questions', got 'some'"):
        final_table(tmp_path, bank_docs="some")


def test_final_table_keeps_only_rows_answered_the_same_way(tmp_path):
    """`report final` resumes from eval.json: a row is kept when its sample, settings and own bank's recipe
    are the ones asked for now, and answered again otherwise (--rerun keeps none)."""
    from doe_ext.dmoe.evaluate import Sample, write
    from doe_ext.dmoe.recipe import DEFAULT, PAPER
    from experiments.dmoe_report import kept_rows, row_arguments

    common = {"knowledge": "k", "base": "b", "questions": 4, "bank_docs": "questions", "compose": "score",
              "temperature": 1.0}
    recipes = {"default": DEFAULT, "paper": PAPER}
    rows = ["base", "sft", "dmoe (paper)", "dmoe (default)"]
    made = {m: row_arguments(m, common, recipes, 8) for m in rows}
    res = {m: [Sample("q?", ["a"], m, 0.0, 0.5, 0.1)] for m in rows}
    write(res, {}, tmp_path, made)
    assert {m: [s.prediction for s in v] for m, v in kept_rows(tmp_path, made).items()} == {m: [m] for m in rows}
    other = {"default": DEFAULT.replace(epochs=3), "paper": PAPER}
    assert list(kept_rows(tmp_path, {m: row_arguments(m, common, other, 8) for m in rows})) == ["base", "dmoe (paper)"]
    assert list(kept_rows(tmp_path, {m: row_arguments(m, common, recipes, 1) for m in rows})) == [
        "base", "dmoe (paper)", "dmoe (default)"]
    assert kept_rows(tmp_path, {m: row_arguments(m, dict(common, questions=5), recipes, 8) for m in rows}) == {}
    data = json.loads((tmp_path / "eval.json").read_text())
    data["samples"]["base"][0]["field_of_another_version"] = 1  # a row this version cannot read is answered again
    (tmp_path / "eval.json").write_text(json.dumps(data))
    assert "base" not in kept_rows(tmp_path, made) and "sft" in kept_rows(tmp_path, made)
    write(res, {}, tmp_path)  # an eval.json that does not say how its rows were answered keeps none
    assert kept_rows(tmp_path, made) == {}


def test_final_markdown_names_the_rows_a_partial_table_lacks():
    from experiments.dmoe_report import FINAL_ROWS, final_markdown

    row = {"em": [0.1, 0.0, 0.2], "f1": [0.1, 0.0, 0.2], "latency_s": 0.1, "triggers": 0.0}
    r = {"knowledge": "k", "base": "b", "questions": 3, "sampled": False, "bank_docs": "questions", "documents": 3,
         "compose": "score", "temperature": 1.0, "summary": {m: row for m in FINAL_ROWS if m != "dmoe (paper)"},
         "paired_em": {m: {"vs_base": [0, 0, 0], "vs_rag": [0, 0, 0]} for m in FINAL_ROWS},
         "seconds": {"build": {}, "sft": 1, "eval": 1, "total": 2}}
    assert "Not run in this table: dmoe (paper)." in final_markdown(r)
    r["summary"]["dmoe (paper)"] = row
    assert "Not run" not in final_markdown(r)
