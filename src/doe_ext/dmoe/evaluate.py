"""One harness for every method of the DMoE evaluation (§4-5): the same prompt format, greedy
decoding, the bank's BM25 over the same surrogates, k passages or experts per question.

Methods:
- ``base``: the frozen model, closed book (should be near 0 EM on knowledge it cannot have).
- ``gold``: the question's own document in the prompt (should be high: the questions are answerable).
- ``rag``: Basic-RAG, the top-k documents for the question in the prompt.
- ``prag``: PRAG, the same documents in the prompt plus their experts active from the first position.
- ``flare``: FLARE-direct (Jiang et al. 2023): generate a look-ahead sentence; if any of its tokens has
  probability below ``theta``, retrieve with the question and the sentence without those tokens, and
  generate the sentence again with the documents in a rewritten prompt (no cache reuse).
- ``sft``: SFT-LoRA, one LoRA (same recipe and placement as an expert) trained on every document's
  instances, active from the first position; trained once per bank content and kept in ``BANK/sft``.
- ``dmoe``: DMoE, closed-book prompt, experts triggered by token uncertainty and routed on the prefix.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from doe_ext.dmoe.augment import qa_prompt
from doe_ext.dmoe.bank import ExpertBank
from doe_ext.dmoe.base import BaseLM
from doe_ext.dmoe.data import read_jsonl
from doe_ext.dmoe.metrics import bootstrap_ci, cut_answer, exact_match, f1, yes_no
from doe_ext.dmoe.model import DMoE

METHODS = ("base", "gold", "rag", "prag", "flare", "sft", "dmoe")
_SENTENCE_END = (".", "?", "!", "\n")


@dataclass
class Sample:
    question: str
    answers: list[str]
    prediction: str
    em: float
    f1: float
    latency_s: float
    peak_rss_mib: float | None = None  # the process's peak resident memory while answering (weights included)
    triggers: int = 0  # DMoE: triggers; FLARE: retrievals
    passages: list[str] = field(default_factory=list)  # ids of the documents in the prompt / experts used
    yes_no: bool = False
    correct_yes_no: float | None = None


def read_questions(path: str | Path) -> list[dict]:
    """``{"question": str, "answers": [str, ...]}`` per line (extra keys kept); errors name the line."""
    out = []
    for n, q in read_jsonl(path):
        if (not isinstance(q, dict) or not isinstance(q.get("question"), str) or not isinstance(q.get("answers"), list)
                or not q["answers"] or not all(isinstance(a, str) for a in q["answers"])):
            raise ValueError(f'{path}:{n}: expected {{"question": str, "answers": [str, ...]}}')
        out.append(q)
    return out


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def flare(dmoe: DMoE, question: str, top_k: int, max_new_tokens: int, theta: float = 0.4, lookahead: int = 16,
          query_tokens: int = 128):
    """FLARE-direct on the harness's prompt. Returns (answer text, number of retrievals, ids retrieved)."""
    tok, bank = dmoe.base.tokenizer, dmoe.bank
    answer: list[int] = []
    docs: list[str] = []
    retrievals, used = 0, []
    eos = dmoe._eos()

    def sentence(passages):
        prompt = qa_prompt(tok, question, [bank.row(i).text for i in passages] or None) + tok.decode(answer)
        g = dmoe.generate(prompt, min(lookahead, max_new_tokens - len(answer)), tau=math.inf)[0]
        for j, t in enumerate(g.tokens):
            if t in eos or any(c in tok.decode([t]) for c in _SENTENCE_END):
                return g.tokens[:j + 1], g.token_probs[:j + 1]
        return g.tokens, g.token_probs

    while len(answer) < max_new_tokens:
        toks, probs = sentence(docs)
        if any(p < theta for p in probs):  # an uncertain sentence: retrieve, rewrite the prompt, redo it
            kept = [t for t, p in zip(toks, probs) if p >= theta]
            query_ids = tok(question, add_special_tokens=False)["input_ids"] + answer + kept
            docs = bank.route(tok.decode(query_ids[-query_tokens:], skip_special_tokens=True), top_k)
            retrievals += 1
            used.extend(docs)
            toks, _ = sentence(docs)
        answer += toks
        if not toks or toks[-1] in eos:
            break
    text = tok.decode([t for t in answer if t not in eos], skip_special_tokens=True).strip()
    return text, retrievals, list(dict.fromkeys(used))


def sft_bank(base: BaseLM, bank: ExpertBank, progress: bool = False) -> ExpertBank:
    """The SFT-LoRA adapter for ``bank``'s documents (with their cached augmentations and the bank's
    recipe), in a bank of one at ``BANK/sft``; trained again only when the documents or recipe change."""
    import hashlib

    from doe_ext.dmoe.augment import Augmentation
    from doe_ext.dmoe.experts import LoRAConfig
    from doe_ext.dmoe.train import TrainConfig, train_adapter

    recipe = json.loads(bank.meta().get("train", "{}"))
    keys = ("lr", "epochs", "batch_size", "weight_decay", "max_length", "seed")
    cfg = TrainConfig(lora=LoRAConfig(bank.lora.rank, bank.lora.alpha), **{k: recipe[k] for k in keys if k in recipe})
    rows = bank.rows()
    corpus = hashlib.sha256(json.dumps([[r.id, r.text, r.augmentation] for r in rows] + [cfg.to_dict()],
                                       sort_keys=True).encode()).hexdigest()
    sft = ExpertBank(bank.path / "sft", create=True, fingerprint=bank.fingerprint, base_name=bank.base_name,
                     lora=bank.lora, dtype=bank.dtype)
    if sft.meta().get("corpus") != corpus or "sft" not in sft:
        e = train_adapter(base, [(r.text, Augmentation.from_json(r.augmentation)) for r in rows], cfg)
        sft.add("sft", e.tensors, f"SFT-LoRA over {len(rows)} documents", "", config=cfg.to_dict(), loss=e.loss)
        sft.set_meta("corpus", corpus)
    return sft


def check_methods(methods: list[str]) -> list[str]:
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"dmoe eval: unknown method {m!r} (methods: {', '.join(METHODS)})")
    return methods


def evaluate(base: BaseLM, bank: ExpertBank, questions: list[dict], methods: list[str] = METHODS, top_k: int = 3,
             tau: float = 2.0, max_new_tokens: int = 32, query_tokens: int = 128,
             progress: bool = True) -> dict[str, list[Sample]]:
    """Run each method on each question, one question at a time (latency is per sample)."""
    check_methods(methods)
    dmoe = DMoE(base, bank, tau=tau, top_k=top_k, query_tokens=query_tokens)
    sft = DMoE(base, sft_bank(base, bank), tau=math.inf) if "sft" in methods else None
    tok = base.tokenizer
    results: dict[str, list[Sample]] = {m: [] for m in methods}
    bar = tqdm(total=len(methods) * len(questions), desc="eval", unit="answer", disable=not progress)
    for m in methods:
        for q in questions:
            measured = _reset_peak_rss()
            t0 = time.perf_counter()
            ids: list[str] = []
            if m in ("rag", "prag"):
                query = tok.decode(tok(q["question"], add_special_tokens=False)["input_ids"][:query_tokens])
                ids = bank.route(query, top_k)
            elif m == "gold":
                if "doc_id" not in q:
                    raise ValueError("dmoe eval: method 'gold' needs a `doc_id` per question")
                ids = [q["doc_id"]]
            if m == "dmoe":
                g = dmoe.generate(qa_prompt(tok, q["question"]), max_new_tokens, route_texts=[q["question"]])[0]
                ids = list(dict.fromkeys(e for t in g.triggers for e in t.experts))
                text, triggers = g.text, len(g.triggers)
            elif m == "sft":
                g = sft.generate(qa_prompt(tok, q["question"]), max_new_tokens, tau=math.inf, experts=[["sft"]])[0]
                text, triggers, ids = g.text, 0, ["sft"]
            elif m == "flare":
                text, triggers, ids = flare(dmoe, q["question"], top_k, max_new_tokens, query_tokens=query_tokens)
            else:
                prompt = qa_prompt(tok, q["question"], [bank.row(i).text for i in ids] or None)
                g = dmoe.generate(prompt, max_new_tokens, tau=math.inf, experts=[ids] if m == "prag" else None)[0]
                text, triggers = g.text, 0
            latency = time.perf_counter() - t0
            peak = _peak_rss_mib() if measured else None
            pred = cut_answer(text)
            is_yn = bool(q.get("yes_no")) or {a.lower() for a in q["answers"]} <= {"yes", "no"}
            results[m].append(Sample(q["question"], q["answers"], pred, exact_match(pred, q["answers"]),
                                     f1(pred, q["answers"]), latency, peak, triggers, ids, is_yn,
                                     float(yes_no(pred) == q["answers"][0].lower()) if is_yn else None))
            bar.update(1)
    bar.close()
    return results


def summarize(results: dict[str, list[Sample]], seed: int = 0) -> dict[str, dict]:
    """Per method: EM, F1, yes/no accuracy (mean, 95% bootstrap low, high over questions), mean latency,
    the largest per-sample peak RSS, and triggers per sample."""
    out = {}
    for m, samples in results.items():
        yn = [s.correct_yes_no for s in samples if s.yes_no]
        out[m] = {"n": len(samples), "em": bootstrap_ci([s.em for s in samples], seed=seed),
                  "f1": bootstrap_ci([s.f1 for s in samples], seed=seed),
                  "yes_no_accuracy": bootstrap_ci(yn, seed=seed) if yn else None, "n_yes_no": len(yn),
                  "latency_s": sum(s.latency_s for s in samples) / max(len(samples), 1),
                  "peak_rss_mib": max((s.peak_rss_mib for s in samples if s.peak_rss_mib is not None), default=None),
                  "triggers": sum(s.triggers for s in samples) / max(len(samples), 1)}
    return out


def markdown(summary: dict[str, dict]) -> str:
    def ci(v):
        return "–" if v is None else f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    rows = ["| method | n | EM [95% CI] | F1 [95% CI] | yes/no acc [95% CI] | latency s/sample | peak RSS MiB | "
            "triggers/sample |", "|---|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        rss = "–" if s["peak_rss_mib"] is None else f"{s['peak_rss_mib']:.0f}"
        rows.append(f"| {m} | {s['n']} | {ci(s['em'])} | {ci(s['f1'])} | {ci(s['yes_no_accuracy'])} | "
                    f"{s['latency_s']:.3f} | {rss} | {s['triggers']:.2f} |")
    return "\n".join(rows) + "\n"


def write(results: dict[str, list[Sample]], summary: dict[str, dict], out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"summary": summary,
                                               "samples": {m: [asdict(s) for s in v] for m, v in results.items()}},
                                              indent=1, ensure_ascii=False))
    (out / "eval.md").write_text(markdown(summary))
