"""``doe-ext dmoe`` as docs/design.md#dmoe fixes it."""
import json

import pytest

from dmoe_testing import DOCS, write_docs
from doe_ext.cli import main
from doe_ext.dmoe import ExpertBank, LoRAConfig


def run(capsys, *argv):
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def built(llama_dir, tmp_path, capsys):
    docs = write_docs(tmp_path / "docs.jsonl", DOCS[:3])
    code, out, err = run(capsys, "dmoe", "build", docs, "--out", tmp_path / "bank", "--base", llama_dir,
                         "--recipe", "paper", "--augment", "none", "--epochs", 2, "--no-progress")
    assert code == 0, err
    assert "3 experts trained, 3 in the bank" in out
    return tmp_path / "bank"


def test_build_is_resumable_and_ls(built, llama_dir, tmp_path, capsys):
    docs = write_docs(tmp_path / "more.jsonl", DOCS)
    code, out, _ = run(capsys, "dmoe", "build", docs, "--out", built, "--base", llama_dir, "--recipe", "paper", "--augment", "none",
                       "--epochs", 2, "--no-progress")
    assert code == 0 and "2 experts trained, 5 in the bank" in out
    code, out, _ = run(capsys, "dmoe", "ls", built, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == [d["id"] for d in DOCS] and all(r["loss"] > 0 for r in rows)
    code, out, _ = run(capsys, "dmoe", "ls", built)
    assert out.startswith("ExpertBank(") and "otter\tloss" in out


def test_a_different_recipe_is_refused(built, llama_dir, tmp_path, capsys):
    docs = write_docs(tmp_path / "d.jsonl", DOCS[:1])
    code, _, err = run(capsys, "dmoe", "build", docs, "--out", built, "--base", llama_dir, "--recipe", "paper", "--augment", "none",
                       "--epochs", 3, "--no-progress")
    assert code == 2 and "was built with another recipe: epochs=2 (asked: 3)" in err


def test_ask_json(built, capsys):
    code, out, err = run(capsys, "dmoe", "ask", built, "What is basalt?", "--tau", 0, "--top-k", 2,
                         "--max-new-tokens", 4, "--json")
    assert code == 0, err
    got = json.loads(out)
    assert set(got) == {"answer", "triggers"} and isinstance(got["answer"], str)
    assert got["triggers"][0]["position"] == 0 and len(got["triggers"][0]["experts"]) == 2
    assert got["triggers"][0]["experts"][0] == "basalt"
    code, out, _ = run(capsys, "dmoe", "ask", built, "What is basalt?", "--tau", "inf", "--max-new-tokens", 4, "--json")
    assert code == 0 and json.loads(out)["triggers"] == []


def test_add_replaces_and_rm(built, tmp_path, capsys):
    before = ExpertBank(built).row("otter").checksum
    docs = write_docs(tmp_path / "new.jsonl", [{"id": "otter", "text": "Otters hold hands while they sleep."},
                                               {"id": "walrus", "text": "The walrus uses its tusks to haul out."}])
    code, out, err = run(capsys, "dmoe", "add", built, docs, "--no-progress")
    assert code == 0, err
    assert "2 experts added, 4 in the bank" in out
    bank = ExpertBank(built)
    assert bank.row("otter").checksum != before and bank.route("tusks", 1) == ["walrus"]
    code, out, _ = run(capsys, "dmoe", "rm", built, "walrus", "otter")
    assert code == 0 and "removed 2, 2 left" in out
    code, _, err = run(capsys, "dmoe", "rm", built, "walrus")
    assert code == 2 and "no expert with id 'walrus'" in err


@pytest.mark.parametrize("line, message", [
    ("not json", "docs.jsonl:2: not JSON"),
    ('{"id": 3, "text": "x"}', 'docs.jsonl:2: expected {"id": str, "text": str}'),
    ('{"id": "a/b", "text": "x"}', "docs.jsonl:2: ExpertBank: invalid expert id 'a/b'"),
    ('{"id": "otter", "text": "again"}', "docs.jsonl:2: id 'otter' already given on line 1"),
    ('{"id": "e", "text": "  "}', "docs.jsonl:2: document 'e' has empty text"),
])
def test_bad_documents_name_the_line(tmp_path, capsys, line, message):
    """Read before the base loads (a base that does not exist is never reached) and before the bank's
    folder is made (none is left behind)."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps(DOCS[0]) + "\n" + line + "\n")
    code, _, err = run(capsys, "dmoe", "build", docs, "--out", tmp_path / "b", "--base", tmp_path / "nomodel",
                       "--no-progress")
    assert code == 2 and message in err and not (tmp_path / "b").exists()


def test_missing_inputs(tmp_path, capsys, usage_error):
    assert usage_error("dmoe", "ls", tmp_path / "nope").endswith(
        f"error: argument bank: {tmp_path / 'nope'}: no such folder")
    code, _, err = run(capsys, "dmoe", "ls", tmp_path)
    assert code == 2 and "no bank here (bank.sqlite missing)" in err
    assert usage_error("dmoe", "build", tmp_path / "none.jsonl", "--out", tmp_path / "b").endswith(
        f"error: argument docs: {tmp_path / 'none.jsonl'}: no such file")
    docs = write_docs(tmp_path / "docs.jsonl", DOCS[:1])
    code, _, err = run(capsys, "dmoe", "build", docs, "--out", tmp_path / "b", "--base", tmp_path / "nomodel")
    assert code == 2 and "is neither a built-in name" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("argv, message", [
    (["dmoe", "ask", "{bank}", "q", "--tau", "-1"], "argument --tau: must be >= 0.0 (inf: never trigger), got -1"),
    (["dmoe", "ask", "{bank}", "q", "--tau", "nan"], "argument --tau: must be >= 0.0 (inf: never trigger), got nan"),
    (["dmoe", "ask", "{bank}", "q", "--tau", "high"], "argument --tau: expected a number, got 'high'"),
    (["dmoe", "ask", "{bank}", "q", "--top-k", "0"], "argument --top-k: must be >= 1, got 0"),
    (["dmoe", "ask", "{bank}", "q", "--temperature", "0"], "argument --temperature: must be > 0, got 0"),
    (["dmoe", "ask", "{bank}", "q", "--max-new-tokens", "2.5"], "argument --max-new-tokens: expected an integer, got '2.5'"),
    (["dmoe", "build", "{docs}", "--out", "{docs}"], "argument --out: {docs} exists and is not a folder"),
    (["dmoe", "build", "{docs}", "--out", "{bank}", "--rank", "0"], "argument --rank: must be >= 1, got 0"),
    (["dmoe", "build", "{docs}", "--out", "{bank}", "--lr", "-0.1"], "argument --lr: must be > 0, got -0.1"),
    (["dmoe", "build", "{docs}", "--out", "{bank}", "--group-size", "0"], "argument --group-size: must be >= 1, got 0"),
    (["dmoe", "build", "{docs}", "--out", "{bank}", "--ray", "-2"], "argument --ray: must be >= 0, got -2"),
    (["dmoe", "build", "{bank}", "--out", "{bank}"], "argument docs: {bank}: a folder, not a file"),
    (["dmoe", "build", "{docs}", "--out", "{bank}", "--instances", "subject,chunk"],
     "argument --instances: expected kinds from chunks, subject, questions, rewrites, shuffled, got 'subject,chunk'"),
    (["dmoe", "eval", "{bank}", "{docs}", "--out", "{docs}"], "argument --out: {docs} exists and is not a folder"),
    (["dmoe", "eval", "{bank}", "{docs}", "--limit", "0"], "argument --limit: must be >= 1, got 0"),
    (["dmoe", "eval", "{bank}", "{docs}", "--shots", "{bank}/x"], "argument --shots: {bank}/x: no such file"),
    (["dmoe", "eval", "{docs}", "{docs}"], "argument bank: {docs}: a file, not a folder"),
    (["dmoe", "reader", "train", "{bank}", "{docs}", "--out", "{bank}/no/r.safetensors"],
     "argument --out: {bank}/no/r.safetensors: the folder {bank}/no does not exist"),
    (["dmoe", "reader", "train", "{bank}", "{docs}", "--out", "{bank}"], "argument --out: {bank} is a folder, not a file"),
    (["dmoe", "reader", "train", "{bank}", "{docs}", "--out", "r.st", "--with-document", "1.5"],
     "argument --with-document: must be >= 0.0 and <= 1.0, got 1.5"),
    (["dmoe", "reader", "add", "{bank}", "{bank}/r.safetensors"], "argument reader: {bank}/r.safetensors: no such file"),
    (["lda", "fit", "{bank}", "--out", "{bank}", "--exclude", "1,x"],
     "argument --exclude: expected comma-separated token ids, got '1,x'"),
])
def test_bad_arguments_are_refused_while_parsing(tmp_path, usage_error, argv, message):
    """Each rule: the message names the argument and the value; nothing is written."""
    bank, docs = tmp_path / "bank", write_docs(tmp_path / "docs.jsonl", DOCS[:1])
    bank.mkdir()
    fill = {"bank": str(bank), "docs": str(docs)}
    assert usage_error(*[a.format(**fill) for a in argv]).endswith("error: " + message.format(**fill))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank", "docs.jsonl"] and not any(bank.iterdir())


@pytest.mark.parametrize("argv", [["--help"], ["dmoe", "build", "--help"], ["dmoe", "ask", "b", "q", "--tau", "-1"],
                                  ["dmoe", "eval", "nope", "nope.jsonl"], ["lda", "fit", "--help"]])
def test_the_command_parses_without_torch(argv):
    """The `doe-ext` script (doe_ext_cli) prints help and refuses arguments before torch or transformers
    is imported (the start-up time is a benchmark: benchmarks/bench_import.py)."""
    import subprocess
    import sys

    code = ("import sys, doe_ext_cli\ntry:\n    doe_ext_cli.main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('exit', e.code, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', "
            "'numpy'}), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    want = 0 if "--help" in argv else 2
    assert done.stderr.strip().splitlines()[-1] == f"exit {want} []", done.stderr


def test_a_command_that_runs_loads_the_package(tmp_path):
    """After parsing, the script loads what `import doe_ext` loads: the ops are registered."""
    import subprocess
    import sys

    code = ("import sys, doe_ext_cli\nrc = doe_ext_cli.main(['dmoe', 'ls', sys.argv[1]])\nimport torch\n"
            "print(rc, hasattr(torch.ops.doe_ext, 'multi_lora_linear_fwd'))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert done.stdout.split() == ["2", "True"] and "no bank here" in done.stderr, done.stderr


def test_default_recipe_is_the_package_default(llama_dir, tmp_path, capsys):
    from doe_ext.dmoe import RECIPES

    docs = write_docs(tmp_path / "docs.jsonl", DOCS[:2])
    code, out, err = run(capsys, "dmoe", "build", docs, "--out", tmp_path / "bank", "--base", llama_dir,
                         "--epochs", 1, "--no-progress")
    assert code == 0, err
    bank = ExpertBank(tmp_path / "bank")
    assert bank.recipe == RECIPES["default"].replace(epochs=1) and bank.recipe.objective == "distill"
    code, out, err = run(capsys, "dmoe", "ask", tmp_path / "bank", "What is basalt?", "--tau", 0, "--compose", "top1",
                         "--max-new-tokens", 2, "--json")
    assert code == 0, err
    assert all(len(t["experts"]) == 1 and t["weights"] == [1.0] for t in json.loads(out)["triggers"])


def test_paper_recipe_with_a_changed_field(llama_dir, tmp_path, capsys):
    from doe_ext.dmoe import RECIPES

    docs = write_docs(tmp_path / "docs.jsonl", DOCS[:1])
    code, _, err = run(capsys, "dmoe", "build", docs, "--out", tmp_path / "bank", "--base", llama_dir, "--recipe",
                       "paper", "--augment", "none", "--rank", 2, "--no-progress")
    assert code == 0, err
    assert ExpertBank(tmp_path / "bank").recipe == RECIPES["paper"].replace(augment="none", lora=LoRAConfig(2, 16.0))
    code, _, err = run(capsys, "dmoe", "build", docs, "--out", tmp_path / "b2", "--base", llama_dir, "--augment",
                       "none", "--no-progress")
    assert code == 2 and "`instances` has 'questions' but `augment` is 'none'" in err
    code, _, err = run(capsys, "dmoe", "build", docs, "--out", tmp_path / "b3", "--base", llama_dir, "--objective",
                       "next_token", "--augment", "none", "--epochs", 1, "--no-progress")
    assert code == 0, err
    assert ExpertBank(tmp_path / "b3").recipe == RECIPES["default"].next_token(augment="none", epochs=1)
    code, _, err = run(capsys, "dmoe", "build", docs, "--out", tmp_path / "b4", "--base", llama_dir, "--augment",
                       "none", "--instances", "subject,shuffled", "--epochs", 1, "--no-progress")
    assert code == 0, err
    assert ExpertBank(tmp_path / "b4").recipe == RECIPES["default"].replace(augment="none", epochs=1,
                                                                           instances=("subject", "shuffled"))


def _commands(parser, prefix=()):
    """Every command path of a parser tree: (), ("dmoe",), ("dmoe", "build"), ..."""
    import argparse

    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, prefix + (name,))


def _all_commands():
    from doe_ext.cli import build_parser

    return [list(c) for c in _commands(build_parser())]


@pytest.mark.parametrize("argv", _all_commands(), ids=lambda a: " ".join(a) or "doe-ext")
def test_help_runs(capsys, argv):
    """``--help`` of every command, found by walking the parser (a new command is covered by itself)."""
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: doe-ext " + " ".join(argv))


def test_every_command_is_walked():
    assert {"corpus build", "lda fit", "lda label", "lda show", "dmoe build", "dmoe eval", "dmoe ls"} <= {
        " ".join(a) for a in _all_commands()}
