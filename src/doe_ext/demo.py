"""The main job (``make demo``): two-stage DoE on a real corpus, with a report.

Corpus: the definitions of the GNU Collaborative International Dictionary of English (Debian's
``dict-gcide``) that carry a subject label — zoology, botany, chemistry, medicine, law, nautical,
music. The label is the "domain" of DoE's Fig. 2; the models never see it.

1. Stage 1: train a BPE tokenizer on the definitions, write a token corpus, fit LDA and give every
   token a topic id (``doe_ext.lda``).
2. Stage 2: train a DoE model (topic ids in, knowledge attention, VAE-ReLU routers, composite loss),
   the dense "Base" of the same width, and the dense Base fed the same topic embedding (the fair
   control), on the same batches; compare held-out next-token loss.
3. Analysis: gate activity by domain per layer (Fig. 2), block-utilisation CV over training (Fig. 4).
4. Report: ``<out>/report.md`` with the numbers and the figures (PNG), ``<out>/metrics.json``.

5. DMoE (``doe_ext.dmoe.report.tour``): every method on both base LMs and both knowledge sets, each on a
   seeded sample of test questions with a bank of their documents; ``--full`` runs instead the full
   400-record bank on all 300 package questions with the threshold sweep (``make reproduce`` does).

    python -m doe_ext.demo --out reports/demo            # within 20 min on 2 CPU cores (README)
    python -m doe_ext.demo --out /tmp/d --quick          # a smoke run

One progress bar covers the whole job, with the time left estimated from each part's expected cost.
Banks, SFT adapters and finished tables are cached under ``--out``: a run stopped by Ctrl-C resumes
where it stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from doe_ext.training import train_model

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
DOMAINS = {"Zool.": "zoology", "Bot.": "botany", "Chem.": "chemistry", "Med.": "medicine", "Law": "law",
           "Naut.": "nautical", "Mus.": "music"}
_TAG = re.compile(r"\((" + "|".join(re.escape(t) for t in DOMAINS) + r")\)")
_NOISE = re.compile(r"\[[^\]]*\]|--[A-Z][\w.]*|\\[^\\]*\\|[{}*`\"]")


def load_gcide_domains(path: Path = GCIDE, per_domain: int = 800, min_words: int = 8, seed: int = 0
                       ) -> list[tuple[str, str]]:
    """``[(definition text, domain)]``: each sense tagged with one of :data:`DOMAINS`, balanced to at
    most ``per_domain`` per domain (a seeded sample)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: install Debian's dict-gcide (`apt-get install dict-gcide`; "
                                "`make setup` does it as root)")
    text = gzip.open(path, "rt", encoding="utf-8", errors="replace").read()
    by_domain: dict[str, list[str]] = {d: [] for d in DOMAINS.values()}
    for block in text.split("\n\n"):
        tags = _TAG.findall(block)
        if len(set(tags)) != 1:
            continue
        body = _NOISE.sub(" ", block[block.index("(" + tags[0] + ")") + len(tags[0]) + 2:])
        body = " ".join(body.split())
        if len(body.split()) >= min_words:
            by_domain[DOMAINS[tags[0]]].append(body)
    rng = np.random.default_rng(seed)
    docs = []
    for domain, texts in by_domain.items():
        for i in rng.permutation(len(texts))[:per_domain]:
            docs.append((texts[i], domain))
    order = rng.permutation(len(docs))
    return [docs[i] for i in order]


class WordVocabulary:
    """The vocabulary of word-level LDA: the lower-cased words of the BPE tokenizer's pre-tokenizer,
    numbered in order of first appearance. ``id_to_token`` lets :meth:`doe_ext.lda.LDA.top_tokens`
    print them."""

    def __init__(self):
        self.words: list[str] = [""]  # id 0: a word the fitted model never saw (never in the LDA vocabulary)
        self.index: dict[str, int] = {"": 0}

    def ids(self, words: list[str]) -> list[int]:
        for w in words:
            if w not in self.index:
                self.index[w] = len(self.words)
                self.words.append(w)
        return [self.index[w] for w in words]

    def id_to_token(self, i: int) -> str:
        return self.words[i]

    def __len__(self) -> int:
        return len(self.words)


@dataclass
class Stage1:
    """DoE's Stage 1 on a corpus: the BPE tokenizer, the LDA model and every token's topic.

    ``unit="token"`` fits LDA on the BPE tokens themselves; ``unit="word"`` fits it on whole
    lower-cased words (alphabetic, at least 3 letters, in at most ``max_doc_freq`` of the documents)
    and gives each token the topic of the word it belongs to (a token outside the LDA vocabulary,
    and the leading [BOS], get the document's dominant topic). ``corpus`` is what the LDA was fitted
    on (token or word ids) and ``vocab`` decodes its ids; ``ids`` and ``topics`` are per document."""

    tokenizer: Any
    lda: Any
    unit: str
    corpus: Any
    vocab: Any
    ids: list[np.ndarray]
    topics: list[np.ndarray]
    theta: np.ndarray
    fit_s: float

    @property
    def topic_ids(self) -> np.ndarray:
        return np.concatenate(self.topics)

    def top_words(self, n: int = 8) -> list[list[str]]:
        return self.lda.top_tokens(n, tokenizer=self.vocab)

    def quality(self, domains: list[str], n: int = 10) -> dict:
        """Mean NPMI coherence of the top-``n`` words (on ``corpus``) and the NMI between each
        document's dominant topic and its domain (a label the LDA never saw)."""
        from doe_ext.analysis import normalized_mutual_info

        return {"npmi": float(self.lda.coherence(self.corpus, n=n).mean()),
                "nmi": normalized_mutual_info(self.theta.argmax(1).tolist(), domains)}

    def label(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(token ids, topic ids)]`` of new texts, labelled by the fitted model ([BOS] first)."""
        from doe_ext.lda import TokenCorpus

        ids, units, word_of = _encode(self.tokenizer, texts, self.vocab if self.unit == "word" else None, grow=False)
        size = len(self.vocab) if self.unit == "word" else self.tokenizer.get_vocab_size()
        corpus = TokenCorpus.from_documents(units, vocab_size=size)
        labels, theta = self.lda.label(corpus)
        return list(zip(ids, _token_topics(labels, theta, corpus, word_of)))


def _encode(tok, texts, words: WordVocabulary | None, grow: bool = True):
    """Token ids per text ([BOS] first); the LDA's units (token ids, or word ids with ``words``);
    and per text the index of each token's word (None for token-level LDA)."""
    bos = tok.token_to_id("[BOS]")
    ids, units, word_of = [], [], []
    for text in texts:
        enc = tok.encode(text)
        ids.append(np.array([bos] + enc.ids, dtype=np.int64))
        if words is None:
            units.append(ids[-1])
            word_of.append(None)
            continue
        pre = [w.lower() for w, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
        if not grow:  # unseen words map to an id the LDA never kept (labelled by the document)
            pre = [w if w in words.index else "" for w in pre]  # "" is id 0
        units.append(np.array(words.ids(pre), dtype=np.int64))
        word_of.append(np.array([-1] + [w if w is not None else -1 for w in enc.word_ids], dtype=np.int64))
    return ids, units, word_of


def _token_topics(labels: np.ndarray, theta: np.ndarray, corpus, word_of) -> list[np.ndarray]:
    """Per document: each token's topic (its word's with word-level LDA; [BOS]: the dominant topic)."""
    out = []
    for d, w in enumerate(word_of):
        lo, hi = int(corpus.offsets[d]), int(corpus.offsets[d + 1])
        unit_topics = labels[lo:hi].astype(np.int64)
        if w is None:
            out.append(unit_topics)
            continue
        dominant = int(theta[d].argmax()) if (unit_topics >= 0).any() else -1
        out.append(np.where(w >= 0, unit_topics[np.maximum(w, 0)] if len(unit_topics) else -1, dominant))
    return out


def stage1(docs: list[tuple[str, str]], out: Path, vocab_size: int, num_topics: int, iterations: int,
           unit: str = "word", max_doc_freq: float = 0.1, alpha: float | None = 0.1, seed: int = 0,
           progress: bool = True) -> Stage1:
    """BPE tokenizer (``out/tokenizer.json``), LDA and a topic id for every token (:class:`Stage1`).
    The defaults (word-level LDA, words in <= 10% of the documents, a sparse document prior
    ``alpha=0.1`` for these short definitions; ``None`` is LDA's 50 / K) were chosen by measurement:
    ``ablations/test_stage1.py`` and ``reports/ablations/stage1.md``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from doe_ext.lda import LDA, TokenCorpus

    if unit not in ("token", "word"):
        raise ValueError(f"stage1: `unit` must be 'token' or 'word', got {unit!r}")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator((t for t, _ in docs), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[BOS]"], show_progress=False))
    tok.save(str(out / "tokenizer.json"))
    words = WordVocabulary() if unit == "word" else None
    ids, units, word_of = _encode(tok, [t for t, _ in docs], words)
    if words is None:
        size, exclude = tok.get_vocab_size(), [tok.token_to_id(s) for s in ("[PAD]", "[UNK]", "[BOS]")]
    else:
        size = len(words)
        exclude = [i for i, w in enumerate(words.words) if not (w.isalpha() and len(w) >= 3)]
    corpus = TokenCorpus.from_documents(units, vocab_size=size).write(out / "corpus", overwrite=True)
    lda = LDA(num_topics=num_topics, alpha=alpha, seed=seed)
    t0 = time.perf_counter()
    lda.fit(corpus, iterations=iterations, progress=progress, exclude=exclude, max_doc_freq=max_doc_freq)
    fit_s = time.perf_counter() - t0
    labels, theta = lda.label(corpus)
    return Stage1(tok, lda, unit, corpus, words if words is not None else tok, ids,
                  _token_topics(labels, np.asarray(theta), corpus, word_of), np.asarray(theta), round(fit_s, 2))


# Stage 2's models: DoE; the dense Base (no topics); the fair control, a dense model fed DoE's topic embedding.
STAGE2_MODELS = {"doe": {}, "dense": {"knowledge": False}, "dense + topics": {"knowledge": False, "topic_input": True}}


def model_config(vocab_size: int, num_topics: int, seq: int, width: int, **extra) -> dict:
    """The demo's Stage-2 model: 3 layers of ``width``, 4 heads, topic and latent width 32."""
    return dict(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=3, num_attention_heads=4,
                intermediate_size=int(2.75 * width), num_topics=num_topics, topic_dim=32, latent_dim=32,
                max_position_embeddings=seq, pad_token_id=0, bos_token_id=2, eos_token_id=2, **extra)


def stage2(train, heldout, vocab_size: int, num_topics: int, steps: int, seq: int, batch: int, width: int,
           progress: bool = True):
    """Train DoE, the dense Base and the fair control (the dense Base fed the same topic embedding as
    DoE) on the same batches; held-out NTP loss of each."""
    results, models, trackers = {}, {}, {}
    for name, extra in STAGE2_MODELS.items():
        res, models[name], trackers[name] = train_model(train, heldout, model_config(vocab_size, num_topics, seq, width,
                                                                                      **extra),
                                                        steps, seq, batch, desc=f"stage 2: {name}",
                                                        progress=progress)
        results[name] = {k: res[k] for k in ("train_ntp_curve", "heldout_ntp", "heldout_ppl", "train_s", "params")}
    return results, models, trackers


class JobProgress:
    """One progress bar for the whole job. Each part weighs its estimated seconds; inside a part the bar
    moves with the clock (up to 95% of the estimate), so tqdm's rate turns the estimates still to run
    into the time left. ``times``: each part's measured seconds."""

    def __init__(self, estimates: dict[str, float], enabled: bool = True):
        from tqdm.auto import tqdm

        self.estimates, self.times = dict(estimates), {}
        self.bar = tqdm(total=sum(self.estimates.values()), unit="s", disable=not enabled, smoothing=0,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed, about {remaining} left")

    def add(self, name: str, estimate: float) -> None:
        """A part known only once the job runs (a DMoE table)."""
        self.estimates[name] = estimate
        self.bar.total = sum(self.estimates.values())

    @contextlib.contextmanager
    def part(self, name: str, estimate: float | None = None):
        if estimate is not None and name not in self.estimates:
            self.add(name, estimate)
        est = self.estimates[name]
        self.bar.set_description_str(name)
        credited, stop, t0 = [0.0], threading.Event(), time.perf_counter()

        def tick():
            while not stop.wait(1.0):
                due = min(time.perf_counter() - t0, 0.95 * est)
                if due > credited[0]:
                    self.bar.update(due - credited[0])
                    credited[0] = due

        clock = threading.Thread(target=tick, daemon=True)
        clock.start()
        try:
            yield
        finally:
            stop.set()
            clock.join()
            self.bar.update(est - credited[0])
            self.times[name] = round(time.perf_counter() - t0, 1)

    def close(self) -> None:
        self.bar.close()


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("reports/demo"))
    ap.add_argument("--quick", action="store_true", help="a smoke run: small corpus, few steps")
    ap.add_argument("--no-dmoe", action="store_true", help="the DoE half only")
    ap.add_argument("--full", action="store_true",
                    help="the DMoE half at full size: the 400-record bank, all 300 package questions on SmolLM2, "
                         "the threshold sweep and the uncertainty bins (hours; make reproduce runs it)")
    ap.add_argument("--sweep-questions", type=int, default=100,
                    help="with --full: test questions of the DMoE threshold sweep (Fig. 6)")
    ap.add_argument("--dmoe-ablations", action="store_true",
                    help="with --full: also run the other DMoE ablations first (make ablate-dmoe; about 35 min on "
                         "2 cores, after the bank)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.dmoe_ablations and not args.full:
        ap.error("--dmoe-ablations: runs with --full (the ablations use the full bank)")
    t_start = time.perf_counter()
    q = args.quick
    cfg = dict(per_domain=60 if q else 800, vocab=600 if q else 2000, topics=8 if q else 16,
               lda_iters=30 if q else 300, steps=6 if q else 400, seq=32 if q else 64, batch=4 if q else 16,
               width=32 if q else 128)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    from doe_ext.analysis import gate_activations_by_label, plot_curves, plot_gate_heatmap

    if not args.no_dmoe:
        from doe_ext.dmoe import report as dmoe_report
    # one display, the job's bar, or none with --no-progress: the parts' own bars (progress=False below)
    # and transformers' (loading a GGUF) stay quiet
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    # estimated seconds of each part on 2 cores (benchmarks/results/history.md, "make demo"): for the time left only
    scale = 0.1 if q else 1.0
    job = JobProgress({"stage 1: LDA": 15 * scale, "stage 2: DoE, dense, dense + topics": 100 * scale,
                       "analysis": 8 * scale}, enabled=not args.no_progress)
    if not args.no_dmoe and not args.full:
        for knowledge, base, n in dmoe_report.tour_plan(q):
            if dmoe_report.missing_base(base) is None:
                job.add(f"DMoE: {knowledge}, {base}", dmoe_report.tour_estimate(knowledge, base, n))
    with job.part("stage 1: LDA"):
        docs = load_gcide_domains(per_domain=cfg["per_domain"])
        s1 = stage1(docs, out, cfg["vocab"], cfg["topics"], cfg["lda_iters"], progress=False)
    ids, topics, tok = s1.ids, s1.topics, s1.tokenizer
    domains = [d for _, d in docs]
    cut = int(0.9 * len(ids))
    train = (ids[:cut], topics[:cut], domains[:cut])
    heldout = (ids[cut:], topics[cut:], domains[cut:])
    with job.part("stage 2: DoE, dense, dense + topics"):
        results, models, trackers = stage2(train, heldout, tok.get_vocab_size(), cfg["topics"], cfg["steps"],
                                           cfg["seq"], cfg["batch"], cfg["width"], progress=False)

    with job.part("analysis"):
        # Gate activity by domain: per-document batches of the held-out split.
        per_doc = [{"input_ids": torch.tensor(x[None].astype(np.int64)),
                    "topic_ids": torch.tensor(t[None].astype(np.int64)), "label": d}
                   for x, t, d in zip(*[[np.asarray(v) for v in heldout[0]], heldout[1], heldout[2]])]
        acts = gate_activations_by_label(models["doe"], per_doc)
        acts = dict(sorted(acts.items()))
        figs = {"loss": out / "train_loss.png", "cv": out / "block_utilisation_cv.png"}
        plot_curves({k: _smooth(v["train_ntp_curve"]) for k, v in results.items()}, figs["loss"],
                    ylabel="next-token loss (smoothed)", title="Stage 2 training: DoE, dense Base, dense + topics")
        plot_curves({f"layer {i}": trackers["doe"].history[:, i] for i in range(trackers["doe"].history.shape[1])},
                    figs["cv"], ylabel="CV of block utilisation", title="Block-utilisation CV over training (Fig. 4)")
        for layer in range(len(next(iter(acts.values()))["active"])):
            figs[f"gates_layer{layer}"] = out / f"gates_by_domain_layer{layer}.png"
            plot_gate_heatmap(acts, figs[f"gates_layer{layer}"], layer=layer)

    metrics = {"config": cfg, "corpus": {"documents": len(docs), "tokens": int(sum(len(x) for x in ids)),
                                         "domains": dict(Counter(domains))},
               "stage1": {"lda_fit_s": s1.fit_s, "unit": s1.unit, **s1.quality(domains)},
               "stage2": {k: {kk: vv for kk, vv in v.items() if kk != "train_ntp_curve"} for k, v in results.items()},
               "gate_activity_by_domain": {d: a["active"].mean(1).tolist() for d, a in acts.items()}}
    report = _report(metrics, s1.top_words(8), figs, acts)
    metrics["doe_seconds"] = round(time.perf_counter() - t_start, 1)
    if not args.no_dmoe:
        if args.full:
            # measured on the slower host (benchmarks/results/history.md, "--full --dmoe-ablations timed whole"): the
            # bank 3,390 s, the ablations 2,034 s, the evaluation and the sweep 2,640 s
            if args.dmoe_ablations:
                with job.part("DMoE ablations (make ablate-dmoe)", (3390 + 2034) * scale):
                    dmoe_report.run_ablations(out, quick=q, progress=False)
            with job.part("DMoE at full size", (2640 + (0 if args.dmoe_ablations else 3390)) * scale):
                dm = dmoe_report.run(out, quick=q, sweep_questions=args.sweep_questions, progress=False)
            report += "\n" + dmoe_report.section(dm)
        else:
            dm = dmoe_report.tour(out, quick=q, part=job.part, progress=False)
            report += "\n" + dmoe_report.tour_section(dm)
        metrics["dmoe_seconds"] = dm["seconds"]["total"]
    job.close()
    metrics["seconds"] = round(time.perf_counter() - t_start, 1)
    metrics["parts"] = job.times
    report = _what_ran(report, metrics, args)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "report.md").write_text(report)
    print(f"report: {out / 'report.md'}")
    return out / "report.md"


def _what_ran(report: str, m: dict, args) -> str:
    """The report's opening: what ran, how long each part took, and the command for the full version."""
    title, _, rest = report.partition("\n")
    lines = [title, "", "## What ran", "",
             f"`python -m doe_ext.demo {' '.join(_argv(args))}`, {m['seconds']} s in all "
             f"({m['seconds'] / 60:.1f} min):", "", "| part | seconds |", "|---|---|"]
    lines += [f"| {name} | {sec} |" for name, sec in m["parts"].items()]
    if args.no_dmoe:
        dmoe = "The DMoE half was not run (`--no-dmoe`)."
    elif args.full:
        dmoe = "The DMoE half ran at full size."
    else:
        dmoe = ("The DMoE half runs every method on samples (each table says how many questions); the full "
                "version of everything here, both bases and both knowledge sets at full size, the sweeps and "
                "the ablations, is `make reproduce` (its parts and their times: docs/findings.md).")
    lines += ["", "The DoE half trains three small models on the GCIDE definitions (one seed; `make ablate` runs "
              "three with intervals). " + dmoe, ""]
    return "\n".join(lines) + rest


def _argv(args) -> list[str]:
    flags = [f"--{k.replace('_', '-')}" for k in ("quick", "full", "no_dmoe", "dmoe_ablations") if getattr(args, k)]
    return ["--out", str(args.out), *flags]


def _smooth(xs, k: int = 20):
    xs = np.asarray(xs, dtype=float)
    k = max(1, min(k, len(xs)))
    return np.convolve(xs, np.ones(k) / k, mode="valid")


def _report(m: dict, top_tokens, figs: dict, acts: dict) -> str:
    s2 = m["stage2"]
    lines = [
        "# doe_ext demo: two-stage DoE on GCIDE definitions", "",
        f"Corpus: {m['corpus']['documents']} dictionary definitions, {m['corpus']['tokens']} tokens, "
        f"domains {m['corpus']['domains']} (from Debian's dict-gcide; the models never see the domain).", "",
        "## Stage 1: LDA", "",
        f"K = {m['config']['topics']} topics, {m['stage1']['unit']}-level LDA (each token takes its word's topic), "
        f"fitted in {m['stage1']['lda_fit_s']} s ({m['config']['lda_iters']} Gibbs sweeps, C++ engine). "
        f"Mean NPMI coherence of the top-10 words {m['stage1']['npmi']:.3f}; NMI between a definition's "
        f"dominant topic and its domain {m['stage1']['nmi']:.3f} (how Stage 1 was chosen: "
        "`reports/ablations/stage1.md`). Top words per topic:", "",
    ]
    lines += [f"- topic {k}: {' '.join(map(str, t))}" for k, t in enumerate(top_tokens)]
    lines += ["", "## Stage 2: DoE vs the dense Base and the fair control (same width, same batches)", "",
              "| model | parameters | held-out next-token loss | perplexity | train time s |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['params']:,} | {v['heldout_ntp']:.3f} | {v['heldout_ppl']:.1f} | {v['train_s']} |"
              for k, v in s2.items()]
    doe, dense, control = (s2[k]["heldout_ppl"] for k in ("doe", "dense", "dense + topics"))
    lines += ["", "DoE reads each token's LDA topic id, which Stage 1 inferred from the whole document, an input the "
              "dense Base does not get. `dense + topics` is the fair control: the dense Base fed the same topic "
              f"embedding. Held-out perplexity: DoE {doe:.1f}, dense + topics {control:.1f}, dense {dense:.1f}; the "
              "architecture's share of DoE's gain over the dense Base is what remains against the control (one "
              "seed here; `make ablate` runs 3 seeds with intervals, Fig. 3 of `reports/ablations`).",
              "", f"![training loss]({figs['loss'].name})", "",
              "## Gate activity by domain (DoE Fig. 2)", "",
              "Share of tokens whose ReLU gate is open, per knowledge block, for each domain:", ""]
    lines += [f"![layer {i}]({figs[f'gates_layer{i}'].name})" for i in range(len(next(iter(acts.values()))["active"]))]
    lines += ["", "| domain | tokens | mean share of open gates per layer |", "|---|---|---|"]
    lines += [f"| {d} | {a['tokens']} | {', '.join(f'{x:.3f}' for x in a['active'].mean(1).tolist())} |"
              for d, a in acts.items()]
    lines += ["", "## Block utilisation over training (Fig. 4)", "", f"![cv]({figs['cv'].name})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
