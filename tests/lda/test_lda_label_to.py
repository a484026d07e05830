import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lda_testing import draw_corpus
from doe_ext.lda import LDA, TokenCorpus


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("label")
    p = draw_corpus(docs=3000, length=60, seed=7)
    corpus = p.corpus.write(root / "shard")
    model = LDA(8, alpha=0.1, seed=0, threads=2).fit(corpus, 30, progress=False, max_doc_freq=None)
    model.save(root / "model")
    return root, corpus, model


def test_label_to_matches_label_and_is_marked_complete(setup, tmp_path):
    _, corpus, model = setup
    out = model.label_to(corpus, tmp_path / "out", chunk_tokens=5000, progress=False)
    topics, theta = corpus.labels(out)
    want_topics, want_theta = model.label(corpus)
    assert np.array_equal(topics, want_topics)
    assert np.array_equal(theta, want_theta.astype(np.float16))
    meta = json.loads((out / "labels.json").read_text())
    assert meta["model"] == model.fingerprint() and meta["num_topics"] == 8
    assert not list(out.glob("*.partial")) and not (out / "labels.progress.json").exists()


def test_label_to_writes_beside_the_shard_by_default(setup, tmp_path):
    _, corpus, model = setup
    shard = TokenCorpus.from_arrays(corpus.tokens, corpus.offsets, corpus.vocab_size).write(tmp_path / "s")
    assert model.label_to(shard, progress=False) == shard.path
    assert (shard.path / "topic_ids.i16").stat().st_size == 2 * shard.num_tokens
    assert (shard.path / "theta.f16").stat().st_size == 2 * shard.num_docs * 8


KILLED_RUN = """
import sys, time
from doe_ext.lda import LDA, TokenCorpus
model = LDA.load(sys.argv[1])
corpus = TokenCorpus.open(sys.argv[2])
model.label_to(corpus, sys.argv[3], chunk_tokens=4000, progress=False,
               callback=lambda done, total: time.sleep(0.05))
"""


def test_a_killed_run_resumes_to_identical_files(setup, tmp_path):
    root, corpus, model = setup
    reference = model.label_to(corpus, tmp_path / "reference", chunk_tokens=4000, progress=False)
    out = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(root / "model"), str(corpus.path), str(out)])
    progress = out / "labels.progress.json"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if progress.exists():
            try:
                done = json.loads(progress.read_text())["done_docs"]
            except (ValueError, KeyError):
                done = 0
            if done >= 600:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the labelling run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "labels.json").exists()  # unfinished, and it does not look finished
    with pytest.raises(Exception, match="labelling has not finished"):
        corpus.labels(out)
    killed_at = json.loads(progress.read_text())["done_docs"]
    assert 0 < killed_at < corpus.num_docs
    seen = []
    model.label_to(corpus, out, chunk_tokens=4000, progress=False, callback=lambda d, t: seen.append(d))
    assert seen[0] > killed_at  # continued, did not start over
    for name in ("topic_ids.i16", "theta.f16"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_a_finished_output_is_kept_and_another_model_redoes_it(setup, tmp_path):
    _, corpus, model = setup
    out = model.label_to(corpus, tmp_path / "o", progress=False)
    calls = []
    model.label_to(corpus, out, progress=False, callback=lambda d, t: calls.append(d))
    assert calls == []  # already complete for this model
    other = LDA(8, alpha=0.1, seed=1, threads=2).fit(corpus, 5, progress=False, max_doc_freq=None)
    other.label_to(corpus, out, progress=False, callback=lambda d, t: calls.append(d))
    assert calls and np.array_equal(corpus.labels(out)[0], other.label(corpus)[0])
