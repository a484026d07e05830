"""Every code block of the README runs (issue 24, part 5), in order, in one fresh directory, as a
newcomer would type them: the Python blocks as written, the shell blocks' commands with their sizes
cut to tiny where this file says so (``TINY``), the pytest block as a test file of its own. A block
that cannot run here says why (``NOT_RUN``); a block this file does not know fails the test, so a new
block cannot go unrun."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)

# the first line of a block -> why it is not run here
NOT_RUN = {
    "make setup": "makes the venv this test runs in (CI runs it on a fresh machine: .ci/run)",
    "make test": "runs this test suite (and `make demo`, the main job, runs in test_demo.py at --quick)",
    "python -m doe_ext.selftest --device cuda": "needs a CUDA device (tests/ops/test_selftest.py runs it where one is)",
}
# (text in the README, what runs here): the long commands at a tiny size
TINY = [
    ("--train-bpe 32000", "--train-bpe 400"), ("--shard-tokens 100000000", "--shard-tokens 100000"),
    ("-k 128 --iterations 200", "-k 8 --iterations 5"), ("num_topics=128, seed=0).fit(corpus, iterations=200)",
                                                         "num_topics=8, seed=0).fit(corpus, iterations=5)"),
]
_NUMBER = re.compile(r"-?\d+\.\d+")


def same_output(shown: str, got: str) -> bool:
    """``got`` prints what the README shows: the same text, each decimal number within 0.01 of the
    shown one (an entropy's last digit may differ across machines)."""
    a, b = shown.strip().splitlines(), got.strip().splitlines()
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if _NUMBER.sub("#", x.rstrip()) != _NUMBER.sub("#", y.rstrip()):
            return False
        if any(abs(float(u) - float(v)) > 0.01 for u, v in zip(_NUMBER.findall(x), _NUMBER.findall(y))):
            return False
    return True


def blocks() -> list[tuple[int, str, str]]:
    """``(line, language, text)`` of every fenced block with a language (the file map has none)."""
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(1), m.group(2)) for m in _FENCE.finditer(text) if m.group(1)]


def tiny(code: str) -> str:
    for long, short in TINY:
        code = code.replace(long, short)
    return code


def inputs(cwd: Path) -> None:
    """The files the README's commands name and do not write themselves: text documents for Stage 1, and
    more.jsonl of the DMoE format (one more document, with the id the README removes)."""
    docs = cwd / "docs"
    docs.mkdir()
    paragraphs = [p for p in README.read_text().split("\n\n") if len(p) > 200]
    for i, p in enumerate(paragraphs):
        (docs / f"{i:03d}.txt").write_text(p)
    (cwd / "more.jsonl").write_text(json.dumps({
        "id": "some-id", "title": "basalt", "text": "Basalt is a dark volcanic rock that forms from lava."}) + "\n")


def run(cmd: list[str] | str, cwd: Path, line: int, timeout: int = 1500) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONUNBUFFERED="1")
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          shell=isinstance(cmd, str), executable="/bin/bash" if isinstance(cmd, str) else None)
    assert done.returncode == 0, f"README.md:{line}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_every_readme_block_runs(tmp_path):
    inputs(tmp_path)
    ran, shown, out = [], 0, None
    for line, lang, code in blocks():
        first = code.strip().splitlines()[0]
        if lang == "text":  # what the block before it prints
            assert out is not None and same_output(code, out), f"README.md:{line}: shows\n{code}\nbut it printed\n{out}"
            shown += 1
            continue
        out = None
        if any(first.startswith(k) for k in NOT_RUN):
            continue
        code = tiny(code)
        if lang == "bash":
            out = run("set -euo pipefail\n" + code, tmp_path, line)
        elif lang == "python" and "def test_" in code:  # a test for the ablation plugin: run it with pytest
            (tmp_path / f"test_readme_{line}.py").write_text(code)
            run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"test_readme_{line}.py",
                 "--ablation-scale", "tiny", "--ablation-seeds", "1", "--ablation-dir", "ablations"], tmp_path, line)
        elif lang == "python":
            (tmp_path / f"readme_{line}.py").write_text(code)
            run([sys.executable, f"readme_{line}.py"], tmp_path, line)
        else:
            pytest.fail(f"README.md:{line}: a ```{lang} block this test does not know how to run")
        ran.append(line)
    assert len(ran) == len(blocks()) - len(NOT_RUN) - shown and shown >= 2, (ran, shown)
    # what the blocks made, where the README says they make it
    assert (tmp_path / "bank").is_dir() and (tmp_path / "doe_model").is_dir() and (tmp_path / "lda-model").exists()
    assert list((tmp_path / "ablations").glob("doe_table3.*"))


def test_same_output_compares_text_exactly_and_numbers_closely():
    shown = "the answer\n  [trigger] position 0  entropy 7.801  experts a, b"
    assert same_output(shown, "the answer\n  [trigger] position 0  entropy 7.806  experts a, b\n")
    assert not same_output(shown, "the answer\n  [trigger] position 0  entropy 7.901  experts a, b")
    assert not same_output(shown, "an answer\n  [trigger] position 0  entropy 7.801  experts a, b")
    assert not same_output(shown, "the answer")


def test_tiny_replacements_match_the_readme():
    """Each replacement still finds its text (else the README changed and the block would run at full size)."""
    text = README.read_text()
    assert [long for long, _ in TINY if long not in text] == []
