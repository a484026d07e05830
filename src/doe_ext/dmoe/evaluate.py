"""One harness for every method of the DMoE evaluation (§4-5): the same prompt format, greedy
decoding up to a line break, the bank's BM25 over the same surrogates, k passages or experts per
question. Questions run in batches (:class:`Harness`); a prompt prefix the batch shares runs once.

Methods:
- ``base``: the frozen model, closed book (should be near 0 EM on knowledge it cannot have).
- ``gold``: the question's own document in the prompt (should be high: the questions are answerable).
- ``rag``: Basic-RAG, the top-k documents for the question in the prompt.
- ``prag``: PRAG, the same documents in the prompt plus their experts active from the first position,
  combined by the harness's composition (the same as DMoE's).
- ``flare``: FLARE-direct (Jiang et al. 2023): generate a look-ahead sentence; if any of its tokens has
  probability below ``theta``, retrieve with the question and the sentence without those tokens, and
  generate the sentence again with the documents in a rewritten prompt (no cache reuse).
- ``sft``: SFT-LoRA, one LoRA (same recipe and placement as an expert) trained on every document's
  instances, active from the first position; given to the harness (:func:`doe_ext.dmoe.build.sft_bank`
  trains it once per bank content and keeps it in ``BANK/sft``: the harness never trains).
- ``dmoe``: DMoE, closed-book prompt, experts triggered by token uncertainty and routed on the prefix.
- ``reader``: a control for banks with a knowledge reader: the reader alone, active from the first
  position, closed book (it must not carry answers by itself).

DMoE and PRAG use the bank's knowledge reader when it has one, unless the harness is made with
``reader=False``.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from doe_ext._memory import peak_rss_mib, reset_peak_rss
from doe_ext.dmoe.augment import ask_prompt, expert_shots
from doe_ext.dmoe.bank import ExpertBank
from doe_ext.dmoe.base import BaseLM
from doe_ext.dmoe.data import read_jsonl
from doe_ext.dmoe.metrics import bootstrap_ci, cut_answer, degenerate, exact_match, f1, hit, yes_no
from doe_ext.dmoe.model import DMoE, Generation, WeightedSet, line_break_tokens
from doe_ext.dmoe.reader import READER_ID
from doe_ext.dmoe.routing import DEFAULT_COMPOSE, DEFAULT_TEMPERATURE, compose, fixed

METHODS = ("base", "gold", "rag", "prag", "flare", "sft", "dmoe")
READER_CONTROL = "reader"  # asked for by name only: it needs a bank with a reader


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
    kind: str | None = None  # the question's template, when the question file says
    entropy: float | None = None  # TU of the first answer token before any expert (DMoE's trigger signal)
    steps: int = 0  # tokens generated (where the method decodes in one pass)


def read_questions(path: str | Path) -> list[dict]:
    """``{"question": str, "answers": [str, ...]}`` per line (extra keys kept); errors name the line."""
    out = []
    for n, q in read_jsonl(path):
        if (not isinstance(q, dict) or not isinstance(q.get("question"), str) or not isinstance(q.get("answers"), list)
                or not q["answers"] or not all(isinstance(a, str) for a in q["answers"])):
            raise ValueError(f'{path}:{n}: expected {{"question": str, "answers": [str, ...]}}')
        out.append(q)
    return out


def read_shots(path: str | Path, bank: ExpertBank | None = None) -> list[tuple[str, str, str]]:
    """Demonstrations ``(question, first answer, passage)`` from a questions file; a line without a
    ``passage`` takes its ``doc_id``'s document from ``bank``."""
    out = []
    for n, q in enumerate(read_questions(path), 1):
        passage = q.get("passage")
        if not isinstance(passage, str):
            if bank is None or q.get("doc_id") not in bank:
                raise ValueError(f"{path}:{n}: a demonstration needs a `passage` or the `doc_id` of a bank document")
            passage = bank.row(q["doc_id"]).text
        out.append((q["question"], q["answers"][0], passage))
    return out


def _first_sentence(tok, tokens: list[int], ends: set[int]) -> int:
    """How many of ``tokens`` make FLARE's look-ahead sentence: up to a line break / EOS token, or a
    ``.?!`` followed by white space (so "github.com" does not end one); all of them if none ends."""
    for j, t in enumerate(tokens):
        if t in ends:
            return j + 1
    text = tok.decode(tokens, skip_special_tokens=True)
    m = re.search(r"[.?!](?=\s)", text)
    if m:
        for j in range(len(tokens)):
            if len(tok.decode(tokens[:j + 1], skip_special_tokens=True)) > m.start():
                return j + 1
    return len(tokens)


@dataclass
class Variant:
    """A DMoE variant for the ablations: its own :class:`DMoE` (tau, top-k, composition, trigger,
    router, site), and with ``oracle=True`` a router per question that returns the question's own
    document (``doc_id``)."""

    name: str
    dmoe: DMoE
    oracle: bool = False


class Harness:
    """What every method shares: the base, the bank (its BM25 and documents), the prompt, greedy
    decoding up to a line break, ``top_k`` passages or experts, queries cut to ``query_tokens``.

    Args:
        shots: demonstrations ``(question, answer, passage)`` for :func:`fewshot_prompt`, for every
            method; none: the chat-template prompt of :func:`qa_prompt` for the methods without experts,
            and the layout the bank's experts were trained in for those with (:meth:`prompt`).
        batch_size: questions answered together; a sample's latency is its batch's wall time over
            the batch size. A prompt prefix the questions share runs once per method (DMoE keeps it
            from one batch to the next).
        sort_by_length: batch the questions in order of their prompt's length (less padding); the
            results keep the questions' order either way.
        compose, temperature: how DMoE's and PRAG's k experts combine (:mod:`doe_ext.dmoe.routing`).
        reader: DMoE's and PRAG's knowledge reader: True, the bank's if it has one; False, none; or a
            :class:`~doe_ext.dmoe.reader.Reader`.
    """

    def __init__(self, base: BaseLM, bank: ExpertBank, shots: list[tuple[str, str, str]] = (), top_k: int = 3,
                 tau: float = 2.0, max_new_tokens: int = 32, query_tokens: int = 128, batch_size: int = 16,
                 flare_theta: float = 0.4, flare_lookahead: int = 16, sort_by_length: bool = True,
                 compose: str = DEFAULT_COMPOSE, temperature: float = DEFAULT_TEMPERATURE,
                 sft: ExpertBank | None = None, reader=True):
        if batch_size < 1:
            raise ValueError(f"dmoe eval: `batch_size` must be >= 1, got {batch_size}")
        self.base, self.bank, self.shots, self.top_k = base, bank, list(shots), top_k
        self.max_new_tokens, self.query_tokens, self.batch_size = max_new_tokens, query_tokens, batch_size
        self.flare_theta, self.flare_lookahead = flare_theta, flare_lookahead
        self.sort_by_length = sort_by_length
        self.tok = base.tokenizer
        self.dmoe = DMoE(base, bank, tau=tau, top_k=top_k, query_tokens=query_tokens, compose=compose,
                         temperature=temperature, reader=reader)
        self.stop = line_break_tokens(self.tok)
        self._sft = None if sft is None else DMoE(base, sft, tau=math.inf)

    def prompt(self, question: str, passages: list[str] | None = None, experts: bool = False) -> str:
        """The harness's shots, if it has any, for every method; without them, the chat template for the
        methods without experts and the layout the bank's experts were trained in for those with
        (``experts``: dmoe, prag, sft, the reader; :func:`~doe_ext.dmoe.augment.expert_shots`)."""
        shots = self.shots or (expert_shots(self.bank.recipe) if experts else ())
        return ask_prompt(self.tok, question, passages, shots)

    def query(self, text: str) -> str:
        return self.tok.decode(self.tok(text, add_special_tokens=False)["input_ids"][:self.query_tokens])

    def passages(self, ids: list[str]) -> list[str]:
        return [self.bank.row(i).text for i in ids]

    def generate(self, dmoe: DMoE, prompts: list[str], max_new_tokens: int | None = None, **kw) -> list[Generation]:
        return dmoe.generate(prompts, max_new_tokens or self.max_new_tokens, stop_tokens=self.stop, **kw)

    def sft(self) -> DMoE:
        """The SFT-LoRA baseline: the adapter the harness was given (``sft``; trained by
        :func:`doe_ext.dmoe.build.sft_bank`: the harness itself never trains)."""
        if self._sft is None:
            raise ValueError("dmoe eval: the method 'sft' needs the SFT-LoRA adapter: "
                             "Harness(..., sft=doe_ext.dmoe.build.sft_bank(base, bank))")
        return self._sft

    def context(self, method: str | Variant, qs: list[dict]) -> list[list[tuple[str, float]]]:
        """The documents each question's prompt holds under ``method``, with their scores: its own
        (gold), BM25's top-k for the question (rag, prag), none (every other method's prompt is closed-book)."""
        if method == "gold":
            return [[(_doc_id(q, "gold"), 1.0)] for q in qs]
        if method in ("rag", "prag"):
            return [self.bank.search(self.query(q["question"]), self.top_k) for q in qs]
        return [[] for _ in qs]

    def prompt_with(self, question: str, hits: list[tuple[str, float]], experts: bool = False) -> str:
        return self.prompt(question, self.passages([i for i, _ in hits]) or None, experts)

    def order(self, method: str | Variant, qs: list[dict]) -> list[int]:
        """Indices of ``qs`` from the shortest first prompt to the longest: batches of prompts of like
        length carry little padding."""
        prompts = [self.prompt_with(q["question"], hits, uses_experts(method))
                   for q, hits in zip(qs, self.context(method, qs))]
        sizes = [len(ids) for ids in self.tok(prompts, add_special_tokens=False)["input_ids"]]
        return sorted(range(len(qs)), key=sizes.__getitem__)

    def answer(self, method: str | Variant, qs: list[dict]) -> list[tuple[Generation | None, str, int, list[str]]]:
        """One batch of questions: per question (generation, text, triggers or retrievals, ids used)."""
        questions = [q["question"] for q in qs]
        if isinstance(method, Variant) or method == "dmoe":
            v = method if isinstance(method, Variant) else Variant("dmoe", self.dmoe)
            routers = [fixed([_doc_id(q, "oracle")]) for q in qs] if v.oracle else None
            gens = self.generate(v.dmoe, [self.prompt(x, experts=True) for x in questions], route_texts=questions,
                                 routers=routers)
            return [(g, g.text, len(g.triggers), list(dict.fromkeys(e for t in g.triggers for e in t.experts)))
                    for g in gens]
        if method == "flare":
            return self._flare(questions)
        if method == READER_CONTROL:
            reader = self.dmoe.reader
            if reader is None:
                raise ValueError(f"dmoe eval: method 'reader' needs a knowledge reader, and {self.bank.path} has none")
            gens = self.generate(self.dmoe, [self.prompt(x, experts=True) for x in questions], tau=math.inf,
                                 experts=[[(READER_ID, reader.weight(self.bank.lora.scale))]] * len(qs))
            return [(g, g.text, 0, []) for g in gens]
        if method == "sft":
            gens = self.generate(self.sft(), [self.prompt(x, experts=True) for x in questions], tau=math.inf,
                                 experts=[[("sft", 1.0)]] * len(qs))
            return [(g, g.text, 0, ["sft"]) for g in gens]
        hits = self.context(method, qs)  # base, gold, rag, prag
        sets: list[WeightedSet] | None = None
        if method == "prag":
            sets = [compose(h, self.dmoe.compose, self.dmoe.temperature) for h in hits]
        gens = self.generate(self.dmoe, [self.prompt_with(x, h, method == "prag") for x, h in zip(questions, hits)],
                             tau=math.inf, experts=sets)
        return [(g, g.text, 0, [i for i, _ in h]) for g, h in zip(gens, hits)]

    def _flare(self, questions: list[str]):
        """FLARE-direct over a batch: look ahead one sentence; where a token has probability below
        theta, retrieve with the question and the sentence without those tokens and write the sentence
        again with the documents in a rewritten prompt (no cache reuse), until the answer ends."""
        tok, n = self.tok, len(questions)
        ends = self.stop | self.dmoe.eos_tokens()
        answers: list[list[int]] = [[] for _ in range(n)]
        docs: list[list[str]] = [[] for _ in range(n)]
        retrievals, used = [0] * n, [[] for _ in range(n)]

        def sentences(rows):
            prompts = [self.prompt(questions[r], self.passages(docs[r]) or None) + tok.decode(answers[r]) for r in rows]
            room = min(self.flare_lookahead, max(self.max_new_tokens - len(answers[r]) for r in rows))
            out = {}
            for r, g in zip(rows, self.generate(self.dmoe, prompts, room, tau=math.inf)):
                cut = min(_first_sentence(tok, g.tokens, ends), self.max_new_tokens - len(answers[r]))
                out[r] = (g.tokens[:cut], g.token_probs[:cut])
            return out

        todo = list(range(n))
        while todo:
            got = sentences(todo)
            redo = [r for r in todo if any(p < self.flare_theta for p in got[r][1])]
            for r in redo:
                kept = [t for t, p in zip(*got[r]) if p >= self.flare_theta]
                query_ids = tok(questions[r], add_special_tokens=False)["input_ids"] + answers[r] + kept
                docs[r] = self.bank.route(tok.decode(query_ids[-self.query_tokens:], skip_special_tokens=True),
                                          self.top_k)
                retrievals[r] += 1
                used[r].extend(docs[r])
            if redo:
                got.update(sentences(redo))
            left = []
            for r in todo:
                toks = got[r][0]
                answers[r] += toks
                if toks and toks[-1] not in ends and len(answers[r]) < self.max_new_tokens:
                    left.append(r)
            todo = left
        return [(None, tok.decode([t for t in a if t not in ends], skip_special_tokens=True).strip(), k,
                 list(dict.fromkeys(u))) for a, k, u in zip(answers, retrievals, used)]


def uses_experts(method: str | Variant) -> bool:
    """Whether a method answers with experts (and so in the layout they were trained in)."""
    return isinstance(method, Variant) or method in ("prag", "sft", "dmoe", READER_CONTROL)


def _doc_id(q: dict, method: str) -> str:
    if "doc_id" not in q:
        raise ValueError(f"dmoe eval: method {method!r} needs a `doc_id` per question")
    return q["doc_id"]


def check_methods(methods: list) -> list:
    for m in methods:
        if not isinstance(m, Variant) and m not in (*METHODS, READER_CONTROL):
            raise ValueError(f"dmoe eval: unknown method {m!r} (methods: {', '.join(METHODS)}, {READER_CONTROL})")
    return methods


def evaluate(harness: Harness, questions: list[dict], methods: list = METHODS,
             progress: bool = True) -> dict[str, list[Sample]]:
    """Every method (a name of ``METHODS`` or a :class:`Variant`) on every question, in batches."""
    check_methods(methods)
    h = harness
    if "sft" in methods:
        h.sft()  # no adapter: refused before any method runs
    results: dict[str, list[Sample]] = {}
    bar = tqdm(total=len(methods) * len(questions), desc="eval", unit="answer", disable=not progress)
    for m in methods:
        name = m.name if isinstance(m, Variant) else m
        bar.set_postfix_str(name)
        out: list[Sample | None] = [None] * len(questions)
        order = h.order(m, questions) if h.sort_by_length else list(range(len(questions)))
        for s in range(0, len(questions), h.batch_size):
            rows = order[s:s + h.batch_size]
            qs = [questions[i] for i in rows]
            measured = reset_peak_rss()
            t0 = time.perf_counter()
            got = h.answer(m, qs)
            latency = (time.perf_counter() - t0) / len(qs)
            peak = peak_rss_mib() if measured else None
            for r, q, (g, text, triggers, ids) in zip(rows, qs, got):
                pred = cut_answer(text)
                is_yn = bool(q.get("yes_no")) or {a.lower() for a in q["answers"]} <= {"yes", "no"}
                out[r] = Sample(q["question"], q["answers"], pred, exact_match(pred, q["answers"]),
                                f1(pred, q["answers"]), latency, peak, triggers, ids, is_yn,
                                float(yes_no(pred) == q["answers"][0].lower()) if is_yn else None,
                                q.get("kind"), g.entropies[0] if g is not None and g.entropies else None,
                                len(g.tokens) if g is not None else 0)
            bar.update(len(qs))
        results[name] = out
    bar.close()
    return results


def summarize(results: dict[str, list[Sample]], seed: int = 0) -> dict[str, dict]:
    """Per method: EM, F1, hit rate (a gold answer inside the prediction), yes/no accuracy (mean, 95%
    bootstrap low, high over questions), mean latency, the largest per-sample peak RSS, triggers per
    sample, and the share of degenerate answers (:func:`~doe_ext.dmoe.metrics.degenerate`)."""
    out = {}
    for m, samples in results.items():
        yn = [s.correct_yes_no for s in samples if s.yes_no]
        out[m] = {"n": len(samples), "em": bootstrap_ci([s.em for s in samples], seed=seed),
                  "f1": bootstrap_ci([s.f1 for s in samples], seed=seed),
                  "hit": bootstrap_ci([hit(s.prediction, s.answers) for s in samples], seed=seed),
                  "yes_no_accuracy": bootstrap_ci(yn, seed=seed) if yn else None, "n_yes_no": len(yn),
                  "latency_s": sum(s.latency_s for s in samples) / max(len(samples), 1),
                  "peak_rss_mib": max((s.peak_rss_mib for s in samples if s.peak_rss_mib is not None), default=None),
                  "triggers": sum(s.triggers for s in samples) / max(len(samples), 1),
                  "degenerate": sum(degenerate(s.prediction) for s in samples) / max(len(samples), 1)}
    return out


def markdown(summary: dict[str, dict]) -> str:
    def ci(v):
        return "–" if v is None else f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    rows = ["| method | n | EM [95% CI] | F1 [95% CI] | hit [95% CI] | yes/no acc [95% CI] | latency s/sample | "
            "peak RSS MiB | triggers/sample | degenerate |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        rss = "–" if s["peak_rss_mib"] is None else f"{s['peak_rss_mib']:.0f}"
        # "hit" and "degenerate" are missing from summaries written before they were measured
        deg = "–" if s.get("degenerate") is None else f"{s['degenerate']:.3f}"
        rows.append(f"| {m} | {s['n']} | {ci(s['em'])} | {ci(s['f1'])} | {ci(s.get('hit'))} | "
                    f"{ci(s['yes_no_accuracy'])} | {s['latency_s']:.3f} | {rss} | {s['triggers']:.2f} | {deg} |")
    return "\n".join(rows) + "\n"


def write(results: dict[str, list[Sample]], summary: dict[str, dict], out: str | Path,
          arguments: dict[str, dict] | None = None, seconds: dict[str, float] | None = None) -> None:
    """``OUT/eval.json`` (every answer) and ``OUT/eval.md``; ``arguments``: what each row was answered
    with, for a later run to tell which rows it can keep; ``seconds``: each row's wall time."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"summary": summary, "samples": {m: [asdict(s) for s in v] for m, v in results.items()}}
    if arguments is not None:
        data["arguments"] = arguments
    if seconds is not None:
        data["seconds"] = seconds
    (out / "eval.json").write_text(json.dumps(data, indent=1, ensure_ascii=False))
    (out / "eval.md").write_text(markdown(summary))
