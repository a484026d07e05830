"""`LDA`: fit a topic model on a :class:`TokenCorpus` and label every token (DoE §3.2, App. A.2).

The sampler, inference and labelling run in the C++ engine ``doe_ext._lda`` (GIL released,
multi-threaded); this module holds hyperparameters, vocabulary filtering, resumable on-disk
labelling and persistence.
"""
from __future__ import annotations

import hashlib
import html
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from doe_ext.lda import corpus as _corpus
from doe_ext.lda.corpus import CorpusError, TokenCorpus, write_json_atomic
from doe_ext.lda.topics import Topics, token_decoder

MODEL_FORMAT = "doe_ext.lda_model"
MODEL_FILE = "model.json"
ARRAYS_FILE = "counts.npz"
MAX_TOPICS = 32767  # topic ids are int16
UNLABELED = ("dominant", "ignore")
SAMPLERS = ("alias", "dense")


def _engine():
    try:
        from doe_ext import _lda
    except ImportError as e:  # pragma: no cover - only without a build
        raise ImportError("doe_ext._lda (the C++ LDA engine) is not built; run `make setup`") from e
    return _lda


def default_threads() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _progress(total: int, desc: str, enabled: bool, unit: str = "it"):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, unit=unit, unit_scale=unit != "it",
                dynamic_ncols=True)


def _engine_call(corpus: TokenCorpus, fn: Callable, *args, **kwargs):
    """Runs an engine call, naming the corpus file in any input error it raises."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise CorpusError(f"{corpus.tokens_file}: {e}") from e


class LDA:
    """Latent Dirichlet Allocation by collapsed Gibbs sampling, with per-token topic labelling.

    Args:
        num_topics: K, in [1, 32767] (topic ids are stored as int16). DoE uses 128.
        alpha: symmetric document-topic prior; ``None`` means 50 / K (Griffiths & Steyvers 2004).
        beta: symmetric topic-word prior.
        seed: the random seed; the same seed and thread count give the same model and labels.
        threads: worker threads (default: the CPUs this process may use).
        sampler: ``"alias"`` — sparse + alias Metropolis-Hastings (AliasLDA, Li et al. 2014): the
            document part of the conditional is summed exactly over the document's non-zero
            topics, the dense word part is drawn from per-word alias tables rebuilt each sweep, and
            an MH test corrects for their staleness; O(topics in the document) per token — or
            ``"dense"``, the exact O(K) conditional. benchmarks/results/history.md has the measurement.
        mh_steps: Metropolis-Hastings steps per token for the alias sampler.
        infer_iterations, infer_tolerance: limits of the per-document theta fixed point used by
            labelling and perplexity (stops when the L1 change of theta is below the tolerance).
    """

    def __init__(self, num_topics: int = 128, alpha: float | None = None, beta: float = 0.01,
                 seed: int = 0, threads: int | None = None, sampler: str = "alias",
                 mh_steps: int = 1, infer_iterations: int = 50, infer_tolerance: float = 1e-4):
        if not isinstance(num_topics, (int, np.integer)) or not 1 <= num_topics <= MAX_TOPICS:
            raise ValueError(f"num_topics must be an integer in [1, {MAX_TOPICS}], got {num_topics!r}")
        if alpha is not None and not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads!r}")
        self.num_topics = int(num_topics)
        self.alpha = float(alpha) if alpha is not None else 50.0 / num_topics
        self.beta = float(beta)
        self.seed = int(seed)
        self.threads = int(threads) if threads is not None else default_threads()
        self.sampler = sampler
        self.mh_steps = int(mh_steps)
        self.infer_iterations = int(infer_iterations)
        self.infer_tolerance = float(infer_tolerance)
        self.vocab_size: int | None = None
        self.word_topic_counts: np.ndarray | None = None  # int32 [V, K]
        self.topic_counts: np.ndarray | None = None  # int64 [K]
        self.keep: np.ndarray | None = None  # uint8 [V]: 1 for words in the LDA vocabulary
        self.fit_info: dict = {}
        self._phi: np.ndarray | None = None

    # vocabulary --------------------------------------------------------------------------------
    def vocabulary_mask(self, corpus: TokenCorpus, exclude: Sequence[int] = (),
                        max_doc_freq: float | None = 0.5, min_count: int = 1) -> np.ndarray:
        """uint8 [V]: 1 for words kept in the LDA vocabulary.

        Drops the ids in ``exclude`` (special tokens), words in more than ``max_doc_freq`` of the
        documents (stop-like tokens; a fraction in (0, 1], None keeps them), and words seen fewer
        than ``min_count`` times.
        """
        counts, df = _engine_call(corpus, _engine().count_words, corpus.tokens, corpus.offsets,
                                  corpus.vocab_size, self.threads)
        keep = counts >= max(min_count, 1)
        if max_doc_freq is not None:
            if not 0 < max_doc_freq <= 1:
                raise ValueError(f"max_doc_freq must be in (0, 1], got {max_doc_freq!r}")
            keep &= df <= max_doc_freq * corpus.num_docs
        exclude = np.asarray(list(exclude), dtype=np.int64)
        if exclude.size:
            if exclude.min() < 0 or exclude.max() >= corpus.vocab_size:
                raise ValueError(f"exclude: ids must be in [0, {corpus.vocab_size}), got "
                                 f"{int(exclude.min())}..{int(exclude.max())}")
            keep[exclude] = False
        return keep.astype(np.uint8)

    # fitting -----------------------------------------------------------------------------------
    def fit(self, corpus: TokenCorpus, iterations: int = 200, progress: bool = True,
            exclude: Sequence[int] = (), max_doc_freq: float | None = 0.5, min_count: int = 1,
            keep: np.ndarray | None = None, assignments_path: str | os.PathLike | None = None,
            callback: Callable[[int, "LDA"], None] | None = None) -> "LDA":
        """Fit by ``iterations`` Gibbs sweeps over ``corpus``.

        Vocabulary filtering: see :meth:`vocabulary_mask` (or pass a precomputed ``keep`` mask).
        The per-token assignments (int16, 2 bytes a token) live in RAM, or in a memory-mapped file
        at ``assignments_path`` for corpora larger than memory. ``callback(sweep, self)`` runs after
        each sweep.
        """
        if corpus.num_docs == 0 or corpus.num_tokens == 0:
            where = corpus.path or "corpus"
            raise CorpusError(f"{where}: empty corpus (no tokens to fit)")
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
        if keep is None:
            keep = self.vocabulary_mask(corpus, exclude, max_doc_freq, min_count)
        keep = np.ascontiguousarray(keep, dtype=np.uint8)
        if keep.shape != (corpus.vocab_size,):
            raise ValueError(f"keep: expected shape ({corpus.vocab_size},), got {keep.shape}")
        if not keep.any():
            raise ValueError("vocabulary filtering kept no word (check exclude / max_doc_freq / min_count)")
        if assignments_path is not None:
            z = np.memmap(assignments_path, dtype=np.int16, mode="w+", shape=(max(corpus.num_tokens, 1),))
            z = z[:corpus.num_tokens]
        else:
            z = np.empty(corpus.num_tokens, dtype=np.int16)
        lda = _engine()
        sampler = _engine_call(corpus, lda.GibbsSampler, corpus.tokens, corpus.offsets, keep, z,
                               self.num_topics, self.alpha, self.beta, self.seed, self.threads,
                               self.sampler, self.mh_steps)
        sampler.initialize()
        start = time.perf_counter()
        with _progress(iterations, "lda fit", progress) as bar:
            for it in range(iterations):
                sampler.sweep(1)
                bar.update(1)
                if callback is not None:
                    callback(it + 1, self._set_counts(sampler, keep, corpus.vocab_size))
        seconds = time.perf_counter() - start
        self._set_counts(sampler, keep, corpus.vocab_size)
        self.fit_info = {
            "iterations": int(iterations), "seconds": seconds, "kept_tokens": int(sampler.kept_tokens),
            "kept_vocab": int(sampler.kept_vocab), "num_docs": int(corpus.num_docs),
            "token_samples_per_s": iterations * sampler.kept_tokens / seconds if seconds > 0 else None,
            "log_joint": float(sampler.log_joint()),
        }
        del sampler, z
        return self

    def _set_counts(self, sampler, keep: np.ndarray, vocab_size: int) -> "LDA":
        self.vocab_size = int(vocab_size)
        self.word_topic_counts = sampler.word_topic()
        self.topic_counts = sampler.topic_counts()
        self.keep = keep
        self._phi = None
        return self

    def _require_fit(self) -> None:
        if self.word_topic_counts is None:
            raise RuntimeError("the model is not fitted: call fit() or LDA.load()")

    @property
    def phi(self) -> np.ndarray:
        """float32 [V, K]: p(w | k), word-major (the engine's layout); 0 for filtered words."""
        self._require_fit()
        if self._phi is None:
            self._phi = _engine().topic_word(self.word_topic_counts, self.topic_counts, self.keep, self.beta)
        return self._phi

    def topic_word(self) -> np.ndarray:
        """float32 [K, V]: each topic's word distribution (rows sum to 1 over the kept vocabulary)."""
        return np.ascontiguousarray(self.phi.T)

    def _check_corpus(self, corpus: TokenCorpus) -> None:
        self._require_fit()
        if corpus.vocab_size != self.vocab_size:
            raise CorpusError(f"{corpus.path or 'corpus'}: vocab size {corpus.vocab_size} does not match "
                              f"the model's {self.vocab_size} (a different tokenizer?)")

    # labelling ---------------------------------------------------------------------------------
    def label(self, corpus: TokenCorpus, unlabeled: str = "dominant") -> tuple[np.ndarray, np.ndarray]:
        """Label every token of an in-memory-sized corpus.

        Returns ``(topic_ids, theta)``: int16 [N] with ``argmax_k theta[d, k] * phi[k, w]`` per
        token (docs/design.md#stage-1-lda) and float32 [D, K]. Tokens outside the LDA vocabulary get their
        document's dominant topic, or -1 with ``unlabeled="ignore"``; a document with no
        in-vocabulary token at all gets -1 throughout. Use :meth:`label_to` for large corpora.
        """
        self._check_corpus(corpus)
        if unlabeled not in UNLABELED:
            raise ValueError(f"unlabeled must be one of {UNLABELED}, got {unlabeled!r}")
        topics = np.empty(corpus.num_tokens, dtype=np.int16)
        theta = np.empty((corpus.num_docs, self.num_topics), dtype=np.float32)
        _engine_call(corpus, _engine().infer, corpus.tokens, corpus.offsets, self.phi, self.keep,
                     self.alpha, self.infer_iterations, self.infer_tolerance, self.threads, theta,
                     topics, unlabeled == "ignore")
        return topics, theta

    def fingerprint(self) -> str:
        """A hash of everything that determines labels (phi, alpha, inference limits)."""
        self._require_fit()
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.phi).tobytes())
        h.update(json.dumps([self.alpha, self.infer_iterations, self.infer_tolerance]).encode())
        return h.hexdigest()[:32]

    def label_to(self, corpus: TokenCorpus, out_path: str | os.PathLike | None = None,
                 unlabeled: str = "dominant", chunk_tokens: int = 1 << 22, progress: bool = True,
                 callback: Callable[[int, int], None] | None = None) -> Path:
        """Label ``corpus`` into files (streaming, bounded memory, resumable).

        Writes ``topic_ids.i16`` (int16 [N]), ``theta.f16`` (float16 [D, K]) and ``labels.json``
        into ``out_path`` (default: the corpus's own folder), ``chunk_tokens`` tokens at a time.
        While running, the arrays are ``*.partial`` files plus ``labels.progress.json``; a killed
        run started again with the same model continues from the last finished chunk. Labels
        depend on nothing but each document, so the result is byte-identical to an uninterrupted
        run. ``labels.json`` appears last: without it the labels are unfinished.
        ``callback(done_docs, num_docs)`` runs after each chunk. Returns the output folder.
        """
        self._check_corpus(corpus)
        if unlabeled not in UNLABELED:
            raise ValueError(f"unlabeled must be one of {UNLABELED}, got {unlabeled!r}")
        out = Path(out_path) if out_path is not None else corpus.path
        if out is None:
            raise ValueError("label_to: an in-memory corpus needs out_path")
        K, N, D = self.num_topics, corpus.num_tokens, corpus.num_docs
        if N == 0:
            raise CorpusError(f"{corpus.path or 'corpus'}: empty corpus (no tokens to label)")
        out.mkdir(parents=True, exist_ok=True)
        job = {"model": self.fingerprint(), "num_topics": K, "num_tokens": N, "num_docs": D,
               "unlabeled": unlabeled, "corpus": _corpus_sample_hash(corpus)}
        final_meta = out / _corpus.LABELS_META_FILE
        if final_meta.is_file():
            try:
                done = json.loads(final_meta.read_text())
            except json.JSONDecodeError:
                done = {}
            if {k: done.get(k) for k in job} == job:
                return out
            final_meta.unlink()  # labels of another model or corpus: redo them
        topics_tmp = out / (_corpus.TOPICS_FILE + ".partial")
        theta_tmp = out / (_corpus.THETA_FILE + ".partial")
        progress_file = out / "labels.progress.json"
        start_doc = 0
        if progress_file.is_file() and topics_tmp.is_file() and theta_tmp.is_file():
            try:
                state = json.loads(progress_file.read_text())
            except json.JSONDecodeError:
                state = {}
            if state.get("job") == job and topics_tmp.stat().st_size == 2 * N \
                    and theta_tmp.stat().st_size == 2 * D * K:
                start_doc = int(state["done_docs"])
        if start_doc == 0:
            for p in (topics_tmp, theta_tmp):
                with open(p, "wb") as f:
                    f.truncate(max(2 * (N if p is topics_tmp else D * K), 0))
            write_json_atomic(progress_file, {"job": job, "done_docs": 0})
        engine = _engine()
        ignore = unlabeled == "ignore"
        # Reads and writes go through the files, not memory maps, so the process holds one chunk
        # whatever the corpus size (mapped pages would count in its RSS).
        with open(topics_tmp, "r+b") as topics_f, open(theta_tmp, "r+b") as theta_f, \
                _progress(N, "lda label", progress, unit="tok") as bar:
            bar.update(int(corpus.offsets[start_doc]))
            for lo, hi in corpus.chunks(chunk_tokens, start_doc):
                tokens, offsets = corpus.read_chunk(lo, hi)
                theta = np.empty((hi - lo, K), dtype=np.float32)
                topics = np.empty(len(tokens), dtype=np.int16)
                _engine_call(corpus, engine.infer, tokens, offsets, self.phi, self.keep, self.alpha,
                             self.infer_iterations, self.infer_tolerance, self.threads, theta,
                             topics, ignore)
                for f, pos, arr in ((topics_f, 2 * int(offsets[0]), topics),
                                    (theta_f, 2 * K * lo, theta.astype(np.float16))):
                    f.seek(pos)
                    f.write(arr.tobytes())
                    f.flush()
                    os.fsync(f.fileno())
                write_json_atomic(progress_file, {"job": job, "done_docs": hi})
                bar.update(len(tokens))
                if callback is not None:
                    callback(hi, D)
        os.replace(topics_tmp, out / _corpus.TOPICS_FILE)
        os.replace(theta_tmp, out / _corpus.THETA_FILE)
        write_json_atomic(final_meta, job)
        progress_file.unlink()
        return out

    # evaluation --------------------------------------------------------------------------------
    def perplexity(self, heldout: TokenCorpus) -> float:
        """Held-out perplexity by document completion (Wallach et al. 2009, "estimated theta").

        Each held-out document's in-vocabulary tokens alternate: the even-position ones estimate
        theta (the same fixed point labelling uses), the odd-position ones are scored by
        ``log sum_k theta[k] * phi[k, w]``; the result is ``exp(-total log-likelihood / scored
        tokens)``. Lower is better; only comparable between models with the same vocabulary mask.
        """
        self._check_corpus(heldout)
        ll, n = _engine_call(heldout, _engine().doc_completion_loglik, heldout.tokens, heldout.offsets,
                             self.phi, self.keep, self.alpha, self.infer_iterations,
                             self.infer_tolerance, self.threads)
        if n == 0:
            raise CorpusError(f"{heldout.path or 'heldout'}: no document has two in-vocabulary tokens")
        return float(np.exp(-ll / n))

    def top_tokens(self, n: int = 10, tokenizer=None) -> list[list]:
        """The ``n`` most probable token ids of each topic, or their strings with a ``tokenizer``
        (a ``tokenizers.Tokenizer``, a Hugging Face tokenizer, or a path to a tokenizer.json)."""
        top = np.argsort(-self.topic_word(), axis=1, kind="stable")[:, :n]
        if tokenizer is None:
            return top.tolist()
        decode = token_decoder(tokenizer)
        return [[decode(int(w)) for w in row] for row in top]

    def topics(self, n: int = 10, tokenizer=None) -> "Topics":
        """:meth:`top_tokens` with each topic's share of the sampled tokens, as a table (HTML in a notebook)."""
        counts = np.asarray(self.topic_counts, dtype=np.float64)
        return Topics(self.top_tokens(n, tokenizer), (counts / max(counts.sum(), 1)).tolist())

    def __repr__(self) -> str:
        fitted = f"fitted on {self.vocab_size} ids" if self.word_topic_counts is not None else "not fitted"
        return (f"LDA(num_topics={self.num_topics}, alpha={self.alpha:g}, beta={self.beta:g}, seed={self.seed}, "
                f"sampler={self.sampler!r}, {fitted})")

    def _repr_html_(self) -> str:
        head = f"<p><b>{html.escape(repr(self))}</b></p>"
        return head + (self.topics(8)._repr_html_() if self.word_topic_counts is not None else "")

    def coherence(self, corpus: TokenCorpus, n: int = 10, measure: str = "npmi",
                  chunk_docs: int = 4096) -> np.ndarray:
        """float64 [K]: topic coherence of each topic's top ``n`` words on ``corpus``.

        ``"npmi"``: mean normalized PMI over word pairs, from document co-occurrence (Bouma 2009;
        range [-1, 1]); ``"umass"``: mean log((D(wi, wj) + 1) / D(wj)) over ordered pairs with wj
        ranked above wi (Mimno et al. 2011). Higher is better.
        """
        self._check_corpus(corpus)
        if measure not in ("npmi", "umass"):
            raise ValueError(f"measure must be 'npmi' or 'umass', got {measure!r}")
        top = np.argsort(-self.topic_word(), axis=1, kind="stable")[:, :n]
        words = np.unique(top)
        index = np.full(corpus.vocab_size, -1, dtype=np.int64)
        index[words] = np.arange(len(words))
        W = len(words)
        co = np.zeros((W, W), dtype=np.float64)
        for lo in range(0, corpus.num_docs, chunk_docs):
            hi = min(lo + chunk_docs, corpus.num_docs)
            tokens, offsets = corpus.slice(lo, hi)
            idx = index[tokens]
            doc = np.repeat(np.arange(hi - lo), np.diff(offsets))
            sel = idx >= 0
            present = np.zeros((hi - lo, W), dtype=np.float32)
            present[doc[sel], idx[sel]] = 1.0
            co += present.T @ present
        df = np.diag(co).copy()
        D = corpus.num_docs
        scores = np.zeros(self.num_topics)
        for k in range(self.num_topics):
            ids = index[top[k]]
            vals = []
            for i in range(1, len(ids)):
                for j in range(i):
                    a, b = ids[i], ids[j]
                    if measure == "umass":
                        vals.append(np.log((co[a, b] + 1.0) / max(df[b], 1.0)))
                    else:
                        p_ab, p_a, p_b = co[a, b] / D, df[a] / D, df[b] / D
                        if p_ab == 0:
                            vals.append(-1.0)
                        elif p_ab == 1:
                            vals.append(1.0)
                        else:
                            vals.append(np.log(p_ab / (p_a * p_b)) / -np.log(p_ab))
            scores[k] = float(np.mean(vals)) if vals else 0.0
        return scores

    # persistence -------------------------------------------------------------------------------
    def _config(self) -> dict:
        return {"format": MODEL_FORMAT, "version": 1, "num_topics": self.num_topics,
                "alpha": self.alpha, "beta": self.beta, "seed": self.seed, "threads": self.threads,
                "sampler": self.sampler, "mh_steps": self.mh_steps,
                "infer_iterations": self.infer_iterations, "infer_tolerance": self.infer_tolerance,
                "vocab_size": self.vocab_size, "fit_info": self.fit_info}

    def state(self) -> dict:
        """Everything :meth:`from_state` needs (JSON-able config + NumPy arrays); what Ray ships."""
        self._require_fit()
        return {"config": self._config(), "nwk": self.word_topic_counts, "nk": self.topic_counts,
                "keep": self.keep}

    @classmethod
    def from_state(cls, state: dict) -> "LDA":
        cfg = state["config"]
        model = cls(num_topics=cfg["num_topics"], alpha=cfg["alpha"], beta=cfg["beta"],
                    seed=cfg["seed"], threads=cfg["threads"], sampler=cfg["sampler"],
                    mh_steps=cfg["mh_steps"], infer_iterations=cfg["infer_iterations"],
                    infer_tolerance=cfg["infer_tolerance"])
        model.vocab_size = int(cfg["vocab_size"])
        model.fit_info = dict(cfg.get("fit_info") or {})
        model.word_topic_counts = np.ascontiguousarray(state["nwk"], dtype=np.int32)
        model.topic_counts = np.ascontiguousarray(state["nk"], dtype=np.int64)
        model.keep = np.ascontiguousarray(state["keep"], dtype=np.uint8)
        return model

    def save(self, path: str | os.PathLike) -> Path:
        """Save to the folder ``path`` (model.json + counts.npz), atomically replacing it."""
        state = self.state()
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.savez(tmp / ARRAYS_FILE, nwk=state["nwk"], nk=state["nk"], keep=state["keep"])
        write_json_atomic(tmp / MODEL_FILE, state["config"])
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = None) -> "LDA":
        """Load a model saved by :meth:`save`; ``threads`` overrides the saved thread count."""
        path = Path(path)
        if not path.is_dir():
            raise CorpusError(f"{path}: no such model folder")
        cfg = _corpus.read_json(path / MODEL_FILE, "LDA model config")
        if cfg.get("format") != MODEL_FORMAT:
            raise CorpusError(f"{path / MODEL_FILE}: not a doe_ext LDA model (format {cfg.get('format')!r})")
        try:
            with np.load(path / ARRAYS_FILE) as z:
                state = {"config": cfg, "nwk": z["nwk"], "nk": z["nk"], "keep": z["keep"]}
        except FileNotFoundError as e:
            raise CorpusError(f"{path / ARRAYS_FILE}: missing") from e
        except Exception as e:  # zipfile / format errors of a damaged file
            raise CorpusError(f"{path / ARRAYS_FILE}: corrupt ({e})") from e
        K, V = cfg["num_topics"], cfg["vocab_size"]
        if state["nwk"].shape != (V, K) or state["nk"].shape != (K,) or state["keep"].shape != (V,):
            raise CorpusError(f"{path / ARRAYS_FILE}: array shapes do not match model.json (V={V}, K={K})")
        if threads is not None:
            cfg = dict(cfg, threads=threads)
            state["config"] = cfg
        return cls.from_state(state)


def _corpus_sample_hash(corpus: TokenCorpus, samples: int = 256) -> str:
    """A cheap identity of a corpus (about ``samples`` offsets and the tokens they point at), so
    resuming or skipping finished labels never mixes up two corpora of the same size."""
    step = max(corpus.num_docs // samples, 1)
    offsets = np.asarray(corpus.offsets[::step])
    starts = offsets[offsets < corpus.num_tokens]
    h = hashlib.sha256(offsets.tobytes())
    h.update(np.asarray(corpus.tokens[starts]).tobytes())
    return h.hexdigest()[:32]
