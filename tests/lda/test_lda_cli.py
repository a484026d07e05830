import json

import numpy as np
import pytest

from lda_testing import draw_corpus
from doe_ext.cli import main
from doe_ext.lda import LDA, TokenCorpus


def write_text_corpus(path, docs=400, seed=0):
    """Documents of planted-topic 'words' (w0 .. w199) as text, blank-line separated."""
    p = draw_corpus(num_topics=4, vocab=200, docs=docs, length=40, seed=seed)
    lines = [" ".join(f"w{t}" for t in p.corpus[d]) for d in range(p.corpus.num_docs)]
    path.write_text("\n\n".join(lines) + "\n")
    return p


def test_build_fit_label_show(tmp_path, capsys):
    text = tmp_path / "docs.txt"
    write_text_corpus(text)
    corpus_dir = tmp_path / "corpus"
    assert main(["corpus", "build", str(text), "--train-bpe", "400", "--out", str(corpus_dir),
                 "--no-progress"]) == 0
    corpus = TokenCorpus.open(corpus_dir)
    assert corpus.num_docs == 400 and corpus.vocab_size <= 400
    assert (corpus_dir / "tokenizer.json").is_file()
    from tokenizers import Tokenizer
    tk = Tokenizer.from_file(str(corpus_dir / "tokenizer.json"))
    first = text.read_text().split("\n\n")[0] + "\n"  # a paragraph keeps its line end
    assert corpus[0].tolist() == tk.encode(first, add_special_tokens=False).ids
    assert corpus.meta["special_token_ids"] == [tk.token_to_id("<|endoftext|>")]

    model_dir = tmp_path / "model"
    assert main(["lda", "fit", str(corpus_dir), "--out", str(model_dir), "-k", "4", "--iterations",
                 "30", "--threads", "2", "--no-progress", "--heldout", str(corpus_dir)]) == 0
    out = capsys.readouterr().out
    assert "held-out perplexity" in out and "saved to" in out
    model = LDA.load(model_dir)
    assert model.num_topics == 4 and model.keep[corpus.meta["special_token_ids"][0]] == 0

    assert main(["lda", "label", str(model_dir), str(corpus_dir), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == f"labels: {corpus_dir}"
    topics, theta = corpus.labels()
    assert np.array_equal(topics, model.label(corpus)[0])

    assert main(["lda", "show", str(model_dir), "-n", "3"]) == 0
    shown = capsys.readouterr().out.strip().splitlines()
    assert len(shown) == 4
    top = model.top_tokens(3, tokenizer=corpus_dir / "tokenizer.json")
    assert all(repr(top[k][0]) in shown[k] for k in range(4))


def test_sharded_build(tmp_path):
    text = tmp_path / "docs.jsonl"
    p = draw_corpus(num_topics=2, vocab=50, docs=30, length=10, seed=1)
    text.write_text("".join(json.dumps({"text": " ".join(f"w{t}" for t in p.corpus[d])}) + "\n"
                            for d in range(30)))
    assert main(["corpus", "build", str(text), "--train-bpe", "100", "--out", str(tmp_path / "c"),
                 "--shard-tokens", "50", "--no-progress"]) == 0
    shards = sorted((tmp_path / "c").glob("shard-*"))
    assert len(shards) > 1
    assert sum(TokenCorpus.open(s).num_docs for s in shards) == 30


def error_of(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("doe-ext: error: ") and "Traceback" not in err
    return err


def test_errors_name_the_file_and_the_problem(tmp_path, capsys):
    empty = TokenCorpus.from_documents([], vocab_size=5).write(tmp_path / "empty")
    assert "empty: empty corpus" in error_of(
        ["lda", "fit", str(empty.path), "--out", str(tmp_path / "m"), "--no-progress"], capsys)
    bad_shard = tmp_path / "bad"
    bad_shard.mkdir()
    assert "bad/meta.json: missing (corpus meta; the shard is unfinished or not a doe_ext corpus)" in error_of(
        ["lda", "fit", str(bad_shard), "--out", str(tmp_path / "m")], capsys)
    text = tmp_path / "t.txt"
    text.write_text("some words\n")
    assert "tk.json: no such tokenizer file" in error_of(
        ["corpus", "build", str(text), "--tokenizer", str(tmp_path / "tk.json"), "--out",
         str(tmp_path / "c")], capsys)
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()


def test_the_commands_topic_limit_is_the_engines():
    """`doe-ext lda fit -k` is checked while parsing, against a copy of the engine's limit (importing the
    engine would load numpy before the arguments parse)."""
    from doe_ext.cli.lda import MAX_TOPICS
    from doe_ext.lda.model import MAX_TOPICS as ENGINE

    assert MAX_TOPICS == ENGINE


@pytest.mark.parametrize("argv, message", [
    (["lda", "fit", "{tmp}/nope", "--out", "{tmp}/m"], "argument corpus: {tmp}/nope: no such folder"),
    (["lda", "fit", "{shard}", "--out", "{text}"], "argument --out: {text} exists and is not a folder"),
    (["lda", "fit", "{shard}", "--out", "{tmp}/m", "-k", "0"], "argument -k/--num-topics: must be >= 1 and <= 32767, got 0"),
    (["lda", "fit", "{shard}", "--out", "{tmp}/m", "-k", "40000"], "argument -k/--num-topics: must be >= 1 and <= 32767, got 40000"),
    (["lda", "fit", "{shard}", "--out", "{tmp}/m", "--iterations", "-1"], "argument --iterations: must be >= 0, got -1"),
    (["lda", "fit", "{shard}", "--out", "{tmp}/m", "--alpha", "0"], "argument --alpha: must be > 0, got 0"),
    (["lda", "fit", "{shard}", "--out", "{tmp}/m", "--beta", "-0.1"], "argument --beta: must be > 0, got -0.1"),
    (["lda", "fit", "{shard}", "--out", "{tmp}/m", "--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["lda", "fit", "{shard}", "--out", "{tmp}/m", "--max-doc-freq", "0"],
     "argument --max-doc-freq: must be > 0.0 and <= 1.0, got 0"),
    (["lda", "fit", "{shard}", "--out", "{tmp}/m", "--max-doc-freq", "1.5"],
     "argument --max-doc-freq: must be > 0.0 and <= 1.0, got 1.5"),
    (["lda", "fit", "{shard}", "--out", "{tmp}/m", "--min-count", "-2"], "argument --min-count: must be >= 0, got -2"),
    (["lda", "fit", "{shard}", "--out", "{tmp}/m", "--heldout", "{tmp}/h"], "argument --heldout: {tmp}/h: no such folder"),
    (["lda", "label", "{tmp}/m", "{shard}"], "argument model: {tmp}/m: no such folder"),
    (["lda", "label", "{shard}", "{tmp}/s2"], "argument shards: {tmp}/s2: no such folder"),
    (["lda", "label", "{shard}", "{shard}", "--chunk-tokens", "0"], "argument --chunk-tokens: must be >= 1, got 0"),
    (["lda", "show", "{shard}", "-n", "0"], "argument -n: must be >= 1, got 0"),
    (["lda", "show", "{shard}", "--tokenizer", "{tmp}/tk.json"], "argument --tokenizer: {tmp}/tk.json: no such file"),
    (["corpus", "build", "{tmp}/missing.txt", "--train-bpe", "100", "--out", "{tmp}/c"],
     "argument inputs: {tmp}/missing.txt: no such file"),
    (["corpus", "build", "{text}", "--train-bpe", "0", "--out", "{tmp}/c"], "argument --train-bpe: must be >= 1, got 0"),
    (["corpus", "build", "{text}", "--train-bpe", "100", "--out", "{text}"],
     "argument --out: {text} exists and is not a folder"),
    (["corpus", "build", "{text}", "--train-bpe", "100", "--out", "{tmp}/c", "--batch-docs", "0"],
     "argument --batch-docs: must be >= 1, got 0"),
    (["corpus", "build", "{text}", "--train-bpe", "100", "--out", "{tmp}/c", "--shard-tokens", "-5"],
     "argument --shard-tokens: must be >= 0, got -5"),
])
def test_arguments_are_refused_while_parsing(tmp_path, usage_error, argv, message):
    """Every number's range and every input folder or file is checked before anything is read or
    written; the message names the argument and shows the value."""
    shard = TokenCorpus.from_documents([[1, 2, 3], [2, 3]], vocab_size=5).write(tmp_path / "shard")
    text = tmp_path / "t.txt"
    text.write_text("some words\n")
    fill = dict(tmp=tmp_path, shard=shard.path, text=text)
    before = sorted(tmp_path.rglob("*"))
    err = usage_error(*[a.format(**fill) for a in argv])
    assert err.endswith("error: " + message.format(**fill)), err
    assert sorted(tmp_path.rglob("*")) == before


def test_label_reports_a_corrupt_shard(tmp_path, capsys):
    p = draw_corpus(num_topics=2, vocab=30, docs=20, length=10, seed=2)
    shard = p.corpus.write(tmp_path / "shard")
    LDA(2, threads=1).fit(shard, 5, progress=False, max_doc_freq=None).save(tmp_path / "m")
    (shard.path / "tokens.u32").write_bytes(b"\0" * 12)
    err = error_of(["lda", "label", str(tmp_path / "m"), str(shard.path)], capsys)
    assert "shard/tokens.u32: corrupt or truncated" in err
    assert not (shard.path / "labels.json").exists()
