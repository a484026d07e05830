"""The ablation plugin (docs/design.md#ablations): its statistics against known values, the verdict logic, the
recorder's files, and the plugin itself in a pytest run of its own (the installed pytest11 entry point)."""
import json
import math
import subprocess
import sys
import textwrap

import pytest

from doe_ext.testing import Ablation, Claim, Interval, mean_ci, paired_difference, verdict
from doe_ext.testing.recorder import write_index

T_975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom


def test_mean_ci_known_values():
    i = mean_ci([1.0, 2.0, 3.0])
    assert (i.mean, i.n) == (2.0, 3)
    assert i.low == pytest.approx(2 - T_975_2 / math.sqrt(3)) and i.high == pytest.approx(2 + T_975_2 / math.sqrt(3))
    one = mean_ci([5.0])
    assert one.mean == 5.0 and math.isnan(one.low) and str(one) == "5 (n=1)"
    with pytest.raises(ValueError, match="mean_ci: no values"):
        mean_ci([])


def test_paired_difference_matches_seeds():
    d = paired_difference({0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.5, 1: 1.5, 2: 2.0, 3: 9.0})  # seed 3: control only
    sd = math.sqrt((0.25 + 0.25 + 1.0) / 2)
    assert d.n == 3 and d.mean == pytest.approx(1.0)
    assert d.high - d.mean == pytest.approx(T_975_2 * sd / math.sqrt(3))
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference({0: 1.0}, {1: 1.0})


@pytest.mark.parametrize("diff, op, want", [
    (Interval(-2.0, -3.0, -1.0, 3), "<", "supported"),
    (Interval(-2.0, -3.0, -1.0, 3), ">", "contradicted"),
    (Interval(2.0, 1.0, 3.0, 3), ">", "supported"),
    (Interval(0.5, -1.0, 2.0, 3), "<", "inconclusive"),
    (Interval(0.0, 0.0, 0.0, 3), "<", "inconclusive"),
    (Interval(-2.0, math.nan, math.nan, 1), "<", "inconclusive"),
])
def test_verdict(diff, op, want):
    assert verdict(diff, op) == want


def test_claim_and_record_errors():
    assert Claim.parse("vae_relu < vae_softmax", "heldout_ppl") == Claim("vae_relu", "<", "vae_softmax", "heldout_ppl")
    with pytest.raises(ValueError, match='a claim reads "<arm> < <arm>" or "<arm> > <arm>", got \'vae_relu <= moe\''):
        Claim.parse("vae_relu <= moe", "ppl")
    a = Ablation("t3", control="moe")
    with pytest.raises(ValueError, match="ablation t3: record\\('moe', 0\\) got no metrics"):
        a.record("moe", 0)
    with pytest.raises(ValueError, match="ablation t3: arm 'moe' seed 1: metrics must be finite numbers, got {'ppl': nan}"):
        a.record("moe", 1, ppl=float("nan"))
    with pytest.raises(ValueError, match="`name` must be a file-name stem"):
        Ablation("../x")


def test_recorder_writes_table_claims_and_plot(tmp_path):
    a = Ablation("table3", control="moe", title="DoE Table 3", notes="`moe`: top-2 of 8 experts.")
    for seed, (moe, relu) in enumerate([(10.0, 9.0), (11.0, 9.5), (12.0, 10.0)]):
        a.record("moe", seed, ppl=moe)
        a.record("vae_relu", seed, ppl=relu)
    a.expect("vae_relu < moe", metric="ppl", paper="14.1 vs 14.3")
    a.expect("vae_relu > moe", metric="ppl")
    paths = a.write(tmp_path, scale="small")
    assert [p.name for p in paths] == ["table3.json", "table3.md", "table3.png"]
    r = json.loads((tmp_path / "table3.json").read_text())
    assert r["arms"]["moe"]["ppl"]["mean"] == pytest.approx(11.0)
    diff = r["paired_vs_control"]["vae_relu"]["ppl"]  # differences -1, -1.5, -2
    assert diff["mean"] == pytest.approx(-1.5) and diff["high"] == pytest.approx(-1.5 + T_975_2 * 0.5 / math.sqrt(3))
    assert [c["verdict"] for c in r["claims"]] == ["supported", "contradicted"]
    md = (tmp_path / "table3.md").read_text()
    assert "| vae_relu < moe on ppl | 14.1 vs 14.3 |" in md and "**supported**" in md
    assert "Scale `small`." in md and md.rstrip().endswith("`moe`: top-2 of 8 experts.")
    a.record("moe", 0, train_s=2.0)
    a.record("vae_relu", 0, train_s=3.0)
    a.write(tmp_path, scale="small")
    (tmp_path / "unrelated.json").write_text("[1, 2]")  # not a table: left out
    index = write_index(tmp_path).read_text().splitlines()
    rows = [ln for ln in index if ln.startswith("| [DoE Table 3]")]
    half = T_975_2 * 0.5 / math.sqrt(3)
    assert rows == [
        f"| [DoE Table 3](table3.md) | small | 3 | vae_relu < moe on ppl | 14.1 vs 14.3 | 9.5 [{9.5 - T_975_2 * 0.5 / math.sqrt(3):.4g}, "
        f"{9.5 + T_975_2 * 0.5 / math.sqrt(3):.4g}] | 11 [{11 - T_975_2 / math.sqrt(3):.4g}, {11 + T_975_2 / math.sqrt(3):.4g}] | "
        f"-1.5 [{-1.5 - half:.4g}, {-1.5 + half:.4g}] | **supported** | 5 |",
        f"| [DoE Table 3](table3.md) | small | 3 | vae_relu > moe on ppl | – | 9.5 [{9.5 - half:.4g}, {9.5 + half:.4g}] | "
        f"11 [{11 - T_975_2 / math.sqrt(3):.4g}, {11 + T_975_2 / math.sqrt(3):.4g}] | -1.5 [{-1.5 - half:.4g}, {-1.5 + half:.4g}] | "
        "**contradicted** | 5 |"]
    assert (tmp_path / "table3.png").read_bytes()[:4] == b"\x89PNG"
    assert a.missing() == []
    a.expect("dense < moe", metric="ppl")
    assert a.missing() == ["table3: no `ppl` for arm 'dense' (claim dense < moe on ppl)"]


SUITE = '''
import pytest

@pytest.mark.parametrize("arm, shift", [("moe", 1.0), ("vae_relu", 0.0)])
def test_arm(ablation, ablation_seeds, ablation_scale, arm, shift):
    table = ablation("demo_table", control="moe", title="toy")
    for seed in ablation_seeds:
        table.record(arm, seed, ppl=10.0 + shift + 0.1 * seed, scale_is_tiny=float(ablation_scale == "tiny"))
    table.expect("vae_relu < moe", metric="ppl", paper="lower")
    {extra}
'''


def run_suite(tmp_path, extra="", *args):
    (tmp_path / "test_suite.py").write_text(textwrap.dedent(SUITE.format(extra=extra)))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_suite.py"),
                           "--ablation-dir", str(tmp_path / "out"), *args], capture_output=True, text=True, cwd=tmp_path)


def test_the_plugin_in_a_pytest_run(tmp_path):
    done = run_suite(tmp_path, "", "--ablation-seeds", "4")
    assert done.returncode == 0, done.stdout + done.stderr
    r = json.loads((tmp_path / "out" / "demo_table.json").read_text())
    assert r["seeds"] == {"moe": [0, 1, 2, 3], "vae_relu": [0, 1, 2, 3]}
    assert r["claims"][0]["verdict"] == "supported" and r["arms"]["moe"]["scale_is_tiny"]["mean"] == 1.0
    assert r["claims"][0]["difference"]["mean"] == pytest.approx(-1.0) and len(r["claims"]) == 1  # stated by both tests, kept once
    assert "| [toy](demo_table.md) | tiny | 4 | vae_relu < moe on ppl | lower |" in (tmp_path / "out" / "README.md").read_text()


def test_a_session_without_its_fixtures_does_not_import_torch(tmp_path):
    """pytest loads the installed plugin in every session; doe_ext (torch, the compiled ops) comes in
    only when a test asks for one of its fixtures."""
    (tmp_path / "test_plain.py").write_text("import sys\n\ndef test_plain():\n    assert 'torch' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_plain.py"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    listed = subprocess.run([sys.executable, "-m", "pytest", "--trace-config", "--co", "-q", "test_plain.py"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert "doe_ext_pytest" in listed.stdout  # the plugin was loaded, through its entry point


def test_the_default_directory_follows_the_scale(tmp_path):
    done = run_suite(tmp_path, "", "--ablation-dir", "")  # empty: the default
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "reports" / "ablations" / "tiny" / "demo_table.json").is_file()


def test_a_claim_without_numbers_fails_the_session(tmp_path):
    done = run_suite(tmp_path, 'table.expect("dense < moe", metric="ppl")')
    assert done.returncode == 1
    assert "ablation without numbers: demo_table: no `ppl` for arm 'dense' (claim dense < moe on ppl)" in done.stdout
    bad = run_suite(tmp_path, "", "--ablation-seeds", "0")
    assert bad.returncode != 0 and "--ablation-seeds must be >= 1, got 0" in bad.stderr


def test_corpus_and_runs_are_cached_and_seeded(tmp_path, monkeypatch):
    from doe_ext.testing import runs

    monkeypatch.setenv("DOE_EXT_CACHE", str(tmp_path))
    corpus = runs.labelled_corpus("tiny")
    assert len(corpus.ids) == len(corpus.topics) == len(corpus.domains) == 7 * runs.SCALES["tiny"]["per_domain"]
    assert all(len(a) == len(b) for a, b in zip(corpus.ids, corpus.topics))
    assert max(int(t.max()) for t in corpus.topics) < corpus.num_topics
    again = runs.labelled_corpus("tiny")  # from the cache file
    assert all((a == b).all() for a, b in zip(corpus.topics, again.topics)) and len(list(tmp_path.rglob("corpus-*"))) == 1
    doe = runs.train_run(corpus, None, seed=0, steps=3)
    dense = runs.train_run(corpus, {"knowledge": False}, seed=0, steps=3)
    assert len(doe["train_ntp_curve"]) == 3 and doe["heldout_ppl"] > 1 and doe["tokens_per_s"] > 0
    assert doe["params"] > dense["params"] and len(doe["utilisation_cv"]) == 3 and dense["utilisation_cv"] == []
    assert doe["peak_rss_mib"] > 50  # this run's peak (Linux)
    assert runs.train_run(corpus, None, seed=0, steps=3) == doe  # cached
    with pytest.raises(ValueError, match=r"train_run: unknown size\(s\) \['lr'\]; sizes are \['batch', "):
        runs.train_run(corpus, None, seed=0, steps=3, lr=1e-3)
    other = runs.train_run(corpus, None, seed=1, steps=3)
    assert other["train_ntp_curve"] != doe["train_ntp_curve"]
    assert len(list(tmp_path.rglob("run-*.json"))) == 3
    files = {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("run-*.json")}
    runs.train_run(corpus, None, seed=0, steps=3)
    runs.train_run(corpus, {"alpha": 0.001, "topic_dim": 32}, seed=0, steps=3)  # the values it runs with anyway
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("run-*.json")} == files  # nothing retrained
