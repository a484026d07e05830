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

5. DMoE (``experiments.dmoe_report.tour``): every method on both base LMs and both knowledge sets, each on a
   seeded sample of test questions with a bank of their documents; ``--full`` runs instead the full
   400-record bank on all 300 package questions with the threshold sweep (``make reproduce`` does).

    python -m experiments.demo --out reports/demo          # within 20 min on 2 CPU cores (README)
    python -m experiments.demo --out /tmp/d --quick        # a smoke run

One progress bar covers the whole job, with the time left estimated from each part's expected cost.
Banks, SFT adapters and finished tables are cached under ``--out``: a run stopped by Ctrl-C resumes
where it stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from doe_ext.analysis import smooth
from doe_ext.stage1 import load_gcide_domains, stage1
from doe_ext.training import stage2


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
        from experiments import dmoe_report
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
        plot_curves({k: smooth(v["train_ntp_curve"]) for k, v in results.items()}, figs["loss"],
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
             f"`python -m experiments.demo {' '.join(_argv(args))}`, {m['seconds']} s in all "
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
