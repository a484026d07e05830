"""Stage-1 LDA benchmark: doe_ext.lda against tomotopy, gensim (LdaMulticore) and scikit-learn.

    python benchmarks/bench_lda.py [--seconds 60] [--topics 128] [--threads 2] [--docs 0]

The corpus is real text from a Debian package: the GCIDE dictionary (``dict-gcide``, installed by
``make setup``), one document per dictionary paragraph, tokenized by a byte-level BPE (8000 ids)
trained on it with ``tokenizers``. One vocabulary filter (tokenizer specials, tokens in more than
10% of documents, tokens seen fewer than 5 times) is applied to the token stream that *every*
library receives, so all fit the same tokens; every 10th document is held out.

Each library runs in its own subprocess (so peak RSS is its own) and fits for the same wall time
on ``--threads`` threads/processes at K = ``--topics``. Reported per library:

- fit throughput: token-samples/s for the Gibbs samplers (sweeps x tokens / fit seconds); for the
  variational ones (gensim, sklearn) tokens processed per second (passes x tokens / seconds);
- held-out perplexity after equal time (and along the way, at sweep checkpoints), all computed by
  the *same* estimator — doe_ext's document-completion estimate (LDA.perplexity) on each library's
  topic-word matrix, renormalized over the shared vocabulary, with alpha = 0.1;
- labelling throughput: tokens/s of per-document inference (+ per-token labels for doe_ext) over
  the held-out documents, inference sweeps included;
- peak RSS of the process, and for doe_ext's streaming label_to, peak RSS on the corpus and on a
  4x larger copy (bounded memory means they match).

Writes benchmarks/results/lda-<host>-<date>.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
ALPHA, BETA = 0.1, 0.01


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------
# corpus
# ------------------------------------------------------------------------------------------------
def build_corpus(work: Path, max_docs: int) -> dict:
    """Tokenize GCIDE, filter the vocabulary once, write train/heldout shards (cached in work/)."""
    from doe_ext.cli.corpus import iter_documents, train_bpe
    from doe_ext.lda import LDA, TokenCorpus

    info_file = work / "corpus.json"
    if info_file.is_file():
        return json.loads(info_file.read_text())
    if not GCIDE.is_file():
        sys.exit(f"{GCIDE}: missing; install the Debian package dict-gcide (make setup does)")
    work.mkdir(parents=True, exist_ok=True)
    docs = [d for d in iter_documents([str(GCIDE)], "text", "text", "paragraph")
            if not d.startswith("00-database")]
    if max_docs:
        docs = docs[:max_docs]
    t0 = time.perf_counter()
    tok = train_bpe(iter(docs), 8000, work / "tokenizer", progress=False)
    ids = []
    for i in range(0, len(docs), 5000):
        ids.extend(tok.encode_batch(docs[i:i + 5000]))
    tokenize_s = time.perf_counter() - t0
    full = TokenCorpus.from_documents(ids, tok.vocab_size)
    keep = LDA(1, threads=2).vocabulary_mask(full, exclude=tok.special_ids, max_doc_freq=0.1, min_count=5)
    filtered = [np.asarray(d, dtype=np.int64)[keep[np.asarray(d, dtype=np.int64)] > 0] for d in ids]
    filtered = [d for d in filtered if len(d) >= 2]
    train = [d for i, d in enumerate(filtered) if i % 10]
    heldout = [d for i, d in enumerate(filtered) if i % 10 == 0]
    V = tok.vocab_size
    TokenCorpus.from_documents(train, V).write(work / "train", overwrite=True)
    TokenCorpus.from_documents(heldout, V).write(work / "heldout", overwrite=True)
    big = TokenCorpus.from_documents(train * 4, V)
    big.write(work / "train_x4", overwrite=True)
    np.save(work / "keep.npy", keep)
    info = {"source": "dict-gcide (GCIDE 0.48), one document per paragraph",
            "tokenizer": "byte-level BPE, 8000 ids, trained on the corpus (tokenizers)",
            "raw_docs": len(docs), "raw_tokens": int(sum(len(d) for d in ids)),
            "filter": "tokenizer specials, document frequency > 10%, count < 5",
            "kept_vocab": int(keep.sum()), "vocab_size": V,
            "train_docs": len(train), "train_tokens": int(sum(len(d) for d in train)),
            "heldout_docs": len(heldout), "heldout_tokens": int(sum(len(d) for d in heldout)),
            "tokenize_seconds": tokenize_s}
    info_file.write_text(json.dumps(info, indent=1))
    return info


def load(work: Path):
    from doe_ext.lda import TokenCorpus
    return (TokenCorpus.open(work / "train"), TokenCorpus.open(work / "heldout"),
            np.load(work / "keep.npy"))


def perplexity(topic_word: np.ndarray, keep: np.ndarray, heldout, threads: int) -> float:
    """doe_ext's document-completion perplexity for any [K, V] topic-word matrix."""
    from doe_ext import _lda
    phi = np.where(keep[None, :] > 0, topic_word, 0.0).astype(np.float64)
    phi /= phi.sum(1, keepdims=True)
    phi = np.ascontiguousarray(phi.T, dtype=np.float32)
    ll, n = _lda.doc_completion_loglik(heldout.tokens, heldout.offsets, phi, keep, ALPHA, 50, 1e-4, threads)
    return float(np.exp(-ll / n))


def docs_of(corpus) -> list[np.ndarray]:
    t = np.asarray(corpus.tokens)
    return [t[corpus.offsets[d]:corpus.offsets[d + 1]] for d in range(corpus.num_docs)]


# ------------------------------------------------------------------------------------------------
# workers: one library each, in a fresh process
# ------------------------------------------------------------------------------------------------
CHECKPOINTS = (10, 25, 50, 100, 200, 400, 800)


def result(train, heldout, fit_s, work, ppl, label_s, fit_rss, base, label_note, sweeps=None,
           cpu_s=None, curve=()) -> dict:
    """One library's row. ``work``: token-samples (Gibbs, when ``sweeps`` is given) or tokens
    processed (online variational Bayes) during ``fit_s`` seconds of fitting."""
    out = {"fit_seconds": fit_s, "fit_rate": work / fit_s, "heldout_perplexity": ppl,
           "curve": list(curve), "label_tokens_per_s": heldout.num_tokens / label_s,
           "label_seconds": label_s, "label_note": label_note, "fit_peak_rss_mib": fit_rss,
           "baseline_rss_mib": base}
    if sweeps is not None:
        out.update(sweeps=sweeps, fit_rate_unit="token-samples/s", fit_cpu_seconds=cpu_s,
                   fit_rate_per_cpu_s=work / cpu_s)
    else:
        out.update(passes=work / train.num_tokens, fit_rate_unit="tokens/s (online VB)")
    return out


def worker_doe_ext(args, train, heldout, keep, sampler: str) -> dict:
    from doe_ext import _lda
    from doe_ext.lda import LDA

    base = rss_mib()
    z = np.empty(train.num_tokens, dtype=np.int16)
    g = _lda.GibbsSampler(train.tokens, train.offsets, keep, z, args.topics, ALPHA, BETA, 0,
                          args.threads, sampler, 1)
    g.initialize()
    curve, fit_s, cpu_s, sweeps = [], 0.0, 0.0, 0
    while fit_s < args.seconds:
        t0, c0 = time.perf_counter(), time.process_time()
        g.sweep(1)
        fit_s += time.perf_counter() - t0
        cpu_s += time.process_time() - c0
        sweeps += 1
        if sweeps in CHECKPOINTS:
            curve.append([sweeps, fit_s, perplexity(_phi_of(g), keep, heldout, args.threads)])
    model = LDA(args.topics, alpha=ALPHA, beta=BETA, threads=args.threads)
    model.vocab_size, model.keep = train.vocab_size, keep
    model.word_topic_counts, model.topic_counts = g.word_topic(), g.topic_counts()
    ppl = model.perplexity(heldout)
    fit_rss = peak_rss_mib()
    del g, z
    gc.collect()
    t0 = time.perf_counter()
    topics, theta = model.label(heldout)
    label_s = time.perf_counter() - t0
    return result(train, heldout, fit_s, sweeps * train.num_tokens, ppl, label_s, fit_rss, base,
                  "theta by EM against fixed phi (<= 50 sweeps, tol 1e-4) + per-token argmax",
                  sweeps=sweeps, cpu_s=cpu_s, curve=curve)


def _phi_of(g) -> np.ndarray:
    nwk = g.word_topic().astype(np.float64) + BETA
    return (nwk / nwk.sum(0, keepdims=True)).T


def worker_tomotopy(args, train, heldout, keep) -> dict:
    import tomotopy as tp

    base = rss_mib()
    mdl = tp.LDAModel(k=args.topics, alpha=ALPHA, eta=BETA, seed=0)
    mdl.optim_interval = 0  # fixed priors, as for every other library here
    docs = docs_of(train)
    for d in docs:
        mdl.add_doc([str(int(w)) for w in d])
    mdl.train(0, workers=args.threads)
    vocab_ids = None
    curve, fit_s, sweeps = [], 0.0, 0

    def topic_word():
        nonlocal vocab_ids
        if vocab_ids is None:
            vocab_ids = np.array([int(s) for s in mdl.used_vocabs])
        tw = np.zeros((args.topics, train.vocab_size))
        for k in range(args.topics):
            tw[k, vocab_ids] = mdl.get_topic_word_dist(k)
        return tw

    cpu_s = 0.0
    while fit_s < args.seconds:
        t0, c0 = time.perf_counter(), time.process_time()
        mdl.train(1, workers=args.threads)
        fit_s += time.perf_counter() - t0
        cpu_s += time.process_time() - c0
        sweeps += 1
        if sweeps in CHECKPOINTS:
            curve.append([sweeps, fit_s, perplexity(topic_word(), keep, heldout, args.threads)])
    ppl = perplexity(topic_word(), keep, heldout, args.threads)
    fit_rss = peak_rss_mib()
    infer_docs = [mdl.make_doc([str(int(w)) for w in d]) for d in docs_of(heldout)]
    t0 = time.perf_counter()
    mdl.infer(infer_docs, workers=args.threads)
    label_s = time.perf_counter() - t0
    return result(train, heldout, fit_s, sweeps * train.num_tokens, ppl, label_s, fit_rss, base,
                  "LDAModel.infer, default 100 Gibbs sweeps (make_doc not timed)",
                  sweeps=sweeps, cpu_s=cpu_s, curve=curve)


def worker_gensim(args, train, heldout, keep) -> dict:
    from gensim.models import LdaMulticore

    base = rss_mib()
    bow = []
    for d in docs_of(train):
        ids, counts = np.unique(d, return_counts=True)
        bow.append(list(zip(ids.tolist(), counts.tolist())))
    id2word = {i: str(i) for i in range(train.vocab_size)}
    chunk = 4000
    t0 = time.perf_counter()
    model = LdaMulticore(num_topics=args.topics, id2word=id2word, workers=max(args.threads - 1, 1),
                         alpha=np.full(args.topics, ALPHA), eta=BETA, chunksize=chunk,
                         random_state=0, passes=1)
    fit_s, tokens_seen = time.perf_counter() - t0, 0
    i = 0
    while fit_s < args.seconds:
        part = bow[i:i + 4 * chunk]
        t0 = time.perf_counter()
        model.update(part)
        fit_s += time.perf_counter() - t0
        tokens_seen += sum(c for doc in part for _, c in doc)
        i = (i + 4 * chunk) % len(bow)
    ppl = perplexity(model.get_topics(), keep, heldout, args.threads)
    fit_rss = peak_rss_mib()
    held_bow = []
    for d in docs_of(heldout):
        ids, counts = np.unique(d, return_counts=True)
        held_bow.append(list(zip(ids.tolist(), counts.tolist())))
    t0 = time.perf_counter()
    for j in range(0, len(held_bow), chunk):
        model.inference(held_bow[j:j + chunk])
    label_s = time.perf_counter() - t0
    return result(train, heldout, fit_s, tokens_seen, ppl, label_s, fit_rss, base,
                  "LdaModel.inference (variational E-step), theta only")


def worker_sklearn(args, train, heldout, keep) -> dict:
    from scipy.sparse import csr_matrix
    from sklearn.decomposition import LatentDirichletAllocation

    base = rss_mib()
    t = np.asarray(train.tokens)
    rows = np.repeat(np.arange(train.num_docs), np.diff(train.offsets))
    X = csr_matrix((np.ones(len(t), dtype=np.float64), (rows, t)),
                   shape=(train.num_docs, train.vocab_size))
    X.sum_duplicates()
    model = LatentDirichletAllocation(n_components=args.topics, doc_topic_prior=ALPHA,
                                      topic_word_prior=BETA, learning_method="online",
                                      batch_size=4096, n_jobs=args.threads, random_state=0,
                                      total_samples=train.num_docs)
    fit_s, tokens_seen, i, batch = 0.0, 0, 0, 4 * 4096
    while fit_s < args.seconds:
        part = X[i:i + batch]
        t0 = time.perf_counter()
        model.partial_fit(part)
        fit_s += time.perf_counter() - t0
        tokens_seen += int(part.sum())
        i = (i + batch) % train.num_docs
    ppl = perplexity(model.components_, keep, heldout, args.threads)
    fit_rss = peak_rss_mib()
    t = np.asarray(heldout.tokens)
    rows = np.repeat(np.arange(heldout.num_docs), np.diff(heldout.offsets))
    Xh = csr_matrix((np.ones(len(t)), (rows, t)), shape=(heldout.num_docs, heldout.vocab_size))
    Xh.sum_duplicates()
    t0 = time.perf_counter()
    model.transform(Xh)
    label_s = time.perf_counter() - t0
    return result(train, heldout, fit_s, tokens_seen, ppl, label_s, fit_rss, base,
                  "LatentDirichletAllocation.transform, theta only")


def worker_label_memory(args, work: Path, which: str) -> dict:
    """Streaming label_to on one shard: peak RSS should not grow with the shard's size."""
    from doe_ext.lda import LDA, TokenCorpus

    corpus = TokenCorpus.open(work / which)
    model = LDA.load(work / "model", threads=args.threads)
    base = rss_mib()
    out = work / f"labels_{which}"
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    model.label_to(corpus, out, progress=False, chunk_tokens=1 << 20)
    s = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"shard": which, "tokens": corpus.num_tokens, "seconds": s,
            "tokens_per_s": corpus.num_tokens / s, "peak_rss_mib": peak_rss_mib(),
            "baseline_rss_mib": base}


def memory_bandwidth_gbs() -> float:
    """Single-thread copy bandwidth (read + write bytes per second) of a 512 MiB buffer."""
    a = np.ones(1 << 26)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t0))
    return best / 1e9


# ------------------------------------------------------------------------------------------------
def run_worker(args, name: str, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--work", str(args.work), "--seconds",
           str(args.seconds), "--topics", str(args.topics), "--threads", str(args.threads), *extra]
    print(f"[bench_lda] {name} {' '.join(extra)} ...", flush=True)
    load0 = os.getloadavg()[0]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:  # one retry: the package may have been mid-rebuild
        time.sleep(30)
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"rc {res.returncode}"}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["load_average_1min"] = [load0, os.getloadavg()[0]]  # before / after: other work on the machine
    return out


def table(results: dict) -> str:
    libs = results["libraries"]
    lines = ["| library | fit rate (wall) | per CPU-second | sweeps / passes in the time | "
             "held-out perplexity | labelling tokens/s | peak RSS MiB (fit) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in libs.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | | | |")
            continue
        done = f"{r['sweeps']} sweeps" if "sweeps" in r else f"{r['passes']:.2f} passes"
        per_cpu = f"{r['fit_rate_per_cpu_s'] / 1e6:.2f} M" if "fit_rate_per_cpu_s" in r else "-"
        lines.append(f"| {name} | {r['fit_rate'] / 1e6:.2f} M {r['fit_rate_unit']} | {per_cpu} | {done} | "
                     f"{r['heldout_perplexity']:.1f} | {r['label_tokens_per_s'] / 1e6:.3f} M | "
                     f"{r['fit_peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60, help="fit wall time per library")
    ap.add_argument("--topics", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--docs", type=int, default=0, help="use only the first N paragraphs (0: all)")
    ap.add_argument("--libs", default="doe_ext,doe_ext-dense,tomotopy,gensim,sklearn")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench_lda")
    ap.add_argument("--results", type=Path, default=None,
                    help="results JSON (default: benchmarks/results/lda-<host>-<date>.json)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--shard", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        train, heldout, keep = load(args.work)
        if args.worker == "doe_ext":
            out = worker_doe_ext(args, train, heldout, keep, "alias")
        elif args.worker == "doe_ext-dense":
            out = worker_doe_ext(args, train, heldout, keep, "dense")
        elif args.worker == "label_memory":
            out = worker_label_memory(args, args.work, args.shard)
        else:
            out = globals()[f"worker_{args.worker}"](args, train, heldout, keep)
        print(json.dumps(out))
        return out

    info = build_corpus(args.work, args.docs)
    print(f"[bench_lda] corpus: {info['train_tokens']} train / {info['heldout_tokens']} held-out tokens, "
          f"{info['kept_vocab']} words", flush=True)
    results = {"corpus": info, "topics": args.topics, "threads": args.threads,
               "fit_seconds_budget": args.seconds, "libraries": {}}
    for lib in args.libs.split(","):
        results["libraries"][lib] = run_worker(args, lib)
    # Streaming labelling memory on the corpus and on a 4x larger one, with a model fitted briefly.
    from doe_ext.lda import LDA
    train, _, keep = load(args.work)
    LDA(args.topics, alpha=ALPHA, beta=BETA, threads=args.threads).fit(
        train, 20, progress=False, keep=keep).save(args.work / "model")
    results["label_to_memory"] = [run_worker(args, "label_memory", ["--shard", s])
                                  for s in ("train", "train_x4")]
    bw = memory_bandwidth_gbs()
    mean_len = info["train_tokens"] / info["train_docs"]
    label_bytes = 4 + 2 + 2 * args.topics / mean_len  # token in, label out, theta (f16) per doc
    fit_bytes = 4 + 2 + 2  # token in, assignment in and out, per token-sample
    results["memory_traffic_floor"] = {
        "copy_bandwidth_gb_s_one_thread": bw,
        "label_bytes_per_token": label_bytes, "label_floor_tokens_per_s": bw * 1e9 / label_bytes,
        "fit_bytes_per_token_sample": fit_bytes, "fit_floor_token_samples_per_s": bw * 1e9 / fit_bytes,
    }
    results["machine"] = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    out = args.results or (ROOT / "benchmarks" / "results" /
                           f"lda-{platform.node()}-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print()
    print(table(results))
    for m in results["label_to_memory"]:
        if "error" not in m:
            print(f"label_to {m['shard']}: {m['tokens']} tokens, {m['tokens_per_s'] / 1e6:.2f} M tokens/s, "
                  f"peak RSS {m['peak_rss_mib']:.0f} MiB")
    print(f"\nwrote {out}")
    return results


def run(device: str) -> list[dict]:
    """Hook for benchmarks/run.py (`make bench`): the LDA engine is CPU-only."""
    if device != "cpu":
        return []
    res = main([])
    return [{"bench": f"lda/{name}", "shape": f"K={res['topics']}, {res['corpus']['train_tokens']} tokens",
             "dtype": "-", "device": "cpu"} for name in res["libraries"]]


if __name__ == "__main__":
    main()
