import json

import numpy as np
import pytest

from lda_testing import draw_corpus, match_topics
from doe_ext.lda import LDA, CorpusError, TokenCorpus

ITERS = 150


@pytest.fixture(scope="module")
def fitted(planted):
    return LDA(8, alpha=0.1, seed=3, threads=2).fit(planted.corpus, ITERS, progress=False,
                                                      max_doc_freq=None)


@pytest.mark.parametrize("sampler", ["alias", "dense"])
@pytest.mark.parametrize("threads", [1, 2])
def test_recovers_planted_topics(planted, sampler, threads):
    model = LDA(8, alpha=0.1, seed=1, threads=threads, sampler=sampler)
    model.fit(planted.corpus, ITERS, progress=False, max_doc_freq=None)
    match, cos = match_topics(model.topic_word(), planted.phi)
    assert cos.mean() >= 0.9, cos
    # Per-token labels against the planted assignments, through the topic matching.
    topics, theta = model.label(planted.corpus)
    to_true = np.empty(8, dtype=np.int64)
    to_true[match] = np.arange(8)
    accuracy = (to_true[topics] == planted.z).mean()
    assert accuracy > 0.75  # chance is 1/8
    assert theta.shape == (planted.corpus.num_docs, 8)
    np.testing.assert_allclose(theta.sum(1), 1.0, rtol=1e-4)


def test_topic_word_rows_are_distributions(fitted, planted):
    tw = fitted.topic_word()
    assert tw.shape == (8, planted.corpus.vocab_size) and tw.dtype == np.float32
    np.testing.assert_allclose(tw.sum(1), 1.0, rtol=1e-4)
    assert fitted.word_topic_counts.sum() == planted.corpus.num_tokens


def test_same_seed_and_threads_give_the_same_model_and_labels(planted):
    def run(seed):
        m = LDA(8, seed=seed, threads=2).fit(planted.corpus, 20, progress=False, max_doc_freq=None)
        return m.word_topic_counts, m.label(planted.corpus)[0]

    (c1, l1), (c2, l2), (c3, _) = run(5), run(5), run(6)
    assert np.array_equal(c1, c2) and np.array_equal(l1, l2)
    assert not np.array_equal(c1, c3)


def test_labels_do_not_depend_on_inference_threads(fitted, planted):
    t1, th1 = LDA.from_state(dict(fitted.state(), config=dict(fitted._config(), threads=1))).label(planted.corpus)
    t2, th2 = fitted.label(planted.corpus)
    assert np.array_equal(t1, t2) and np.array_equal(th1, th2)


def test_label_is_argmax_of_theta_times_phi(fitted, planted):
    topics, theta = fitted.label(planted.corpus)
    phi = fitted.topic_word()
    c = planted.corpus
    for d in (0, 7, 123):
        words = c[d]
        want = np.argmax(theta[d][:, None] * phi[:, words], axis=0)
        assert np.array_equal(topics[c.offsets[d]:c.offsets[d + 1]], want)


def test_vocabulary_filtering_and_unlabeled_tokens():
    p = draw_corpus(num_topics=4, vocab=100, docs=120, length=40, seed=4, extra_ids=2)
    special, stop = 100, 101
    docs = []
    for d in range(p.corpus.num_docs):  # a special token opens every document, a stop word in each
        docs.append([special] + p.corpus[d].tolist() + [stop])
    corpus = TokenCorpus.from_documents(docs, p.corpus.vocab_size)
    model = LDA(4, seed=0, threads=2).fit(corpus, 60, progress=False, exclude=[special],
                                           max_doc_freq=0.9)
    assert model.keep[special] == 0 and model.keep[stop] == 0  # excluded / in 100% of documents
    assert model.keep[:100].sum() == (np.bincount(p.corpus.tokens, minlength=100) > 0).sum()
    assert np.all(model.topic_word()[:, [special, stop]] == 0)
    topics, theta = model.label(corpus)
    firsts = corpus.offsets[:-1]
    assert np.array_equal(topics[firsts], theta.argmax(1))  # the document's dominant topic
    ignored, _ = model.label(corpus, unlabeled="ignore")
    assert np.all(ignored[firsts] == -1) and np.all(ignored[corpus.offsets[1:] - 1] == -1)
    kept = model.keep[corpus.tokens].astype(bool)
    assert np.array_equal(ignored[kept], topics[kept])


def test_perplexity_and_coherence_reward_the_fit(planted):
    heldout = draw_corpus(docs=60, seed=0).corpus  # same topics (same seed), new documents
    short = LDA(8, alpha=0.1, seed=0, threads=2).fit(planted.corpus, 1, progress=False, max_doc_freq=None)
    long = LDA(8, alpha=0.1, seed=0, threads=2).fit(planted.corpus, ITERS, progress=False, max_doc_freq=None)
    assert long.perplexity(heldout) < 0.8 * short.perplexity(heldout)
    assert long.perplexity(heldout) < (long.keep > 0).sum()  # better than a uniform distribution
    for measure in ("npmi", "umass"):
        assert long.coherence(planted.corpus, measure=measure).mean() > \
            short.coherence(planted.corpus, measure=measure).mean()
    top = long.top_tokens(5)
    assert len(top) == 8 and all(len(t) == 5 for t in top)
    assert top[0][0] == int(np.argmax(long.topic_word()[0]))
    topics = long.topics(5)  # the same tokens, each topic's share of the sampled tokens, a notebook table
    assert list(topics) == top and sum(topics.shares) == pytest.approx(1.0)
    assert topics.shares[0] == pytest.approx(long.topic_counts[0] / long.topic_counts.sum())
    table = long._repr_html_()
    assert table.count("<tr>") == 1 + 8 and f"<td>{' '.join(map(str, top[0]))}</td>" not in table  # 8 tokens shown
    assert f"<td>{' '.join(map(str, long.top_tokens(8)[3]))}</td>" in table and "num_topics=8" in table
    assert "not fitted" in repr(LDA(num_topics=3)) and LDA(num_topics=3)._repr_html_().count("<tr>") == 0


def test_save_load_round_trip(fitted, planted, tmp_path):
    fitted.save(tmp_path / "model")
    loaded = LDA.load(tmp_path / "model")
    assert (loaded.num_topics, loaded.alpha, loaded.beta) == (fitted.num_topics, fitted.alpha, fitted.beta)
    assert np.array_equal(loaded.topic_word(), fitted.topic_word())
    a, b = fitted.label(planted.corpus), loaded.label(planted.corpus)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert loaded.fingerprint() == fitted.fingerprint()
    (tmp_path / "model" / "counts.npz").write_bytes(b"garbage")
    with pytest.raises(CorpusError, match=r"counts\.npz: corrupt"):
        LDA.load(tmp_path / "model")
    (tmp_path / "model" / "model.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CorpusError, match=r"model\.json: not a doe_ext LDA model"):
        LDA.load(tmp_path / "model")


@pytest.mark.parametrize("k", [0, -3, 40000])
def test_num_topics_out_of_range(k):
    with pytest.raises(ValueError, match=r"num_topics must be an integer in \[1, 32767\]"):
        LDA(num_topics=k)


def test_bad_corpora_are_named(fitted, tmp_path):
    empty = TokenCorpus.from_documents([], vocab_size=10).write(tmp_path / "empty")
    with pytest.raises(CorpusError, match=r"empty: empty corpus"):
        LDA(4).fit(empty, 1, progress=False)
    # A shard whose meta understates the vocabulary: the engine finds the token and names the file.
    shard = TokenCorpus.from_documents([[1, 2], [3, 9]], vocab_size=10).write(tmp_path / "bad")
    meta = json.loads((shard.path / "meta.json").read_text())
    meta["vocab_size"] = 5
    (shard.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CorpusError, match=r"bad/tokens\.u32: .*token id 9 >= vocab size 5 at token 3"):
        LDA(2).fit(TokenCorpus.open(shard.path), 1, progress=False, max_doc_freq=None)
    other_vocab = TokenCorpus.from_documents([[1, 2]], vocab_size=7)
    with pytest.raises(CorpusError, match="vocab size 7 does not match the model's 400"):
        fitted.label(other_vocab)


def test_engine_calls_release_the_gil(fitted):
    import threading
    import time

    big = draw_corpus(docs=8000, length=100, seed=9).corpus
    done = threading.Event()
    worker = threading.Thread(target=lambda: ([fitted.label(big) for _ in range(5)], done.set()))
    ticks = 0
    worker.start()
    while not done.is_set():  # runs only while the engine call has let go of the GIL
        ticks += 1
        time.sleep(0.0005)
    worker.join()
    assert ticks >= 20, ticks
