"""Answer metrics (SQuAD's normalisation) and bootstrap intervals, as the DMoE evaluation reports them."""
from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_CUE = re.compile(r"the answer is\s*:?\s*", re.IGNORECASE)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1: lower case, drop punctuation, drop articles (a, an, the), collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def cut_answer(text: str) -> str:
    """The answer part of a generation, as PRAG cuts it: after the last "the answer is" if present,
    then up to the first line break."""
    parts = _CUE.split(text)
    text = parts[-1] if len(parts) > 1 else text
    return text.strip().split("\n", 1)[0].strip()


def exact_match(prediction: str, answers: list[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


def hit(prediction: str, answers: list[str]) -> float:
    """1 when a gold answer's words occur, in order and whole, in the prediction (both normalised): the
    hit rate of answers given as sentences ("The Vouram frame is driven by horses.")."""
    p = f" {normalize_answer(prediction)} "
    return float(any(normalize_answer(a) and f" {normalize_answer(a)} " in p for a in answers))


def f1(prediction: str, answers: list[str]) -> float:
    """Token F1 against the best-matching gold answer."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for a in answers:
        gold = normalize_answer(a).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        same = sum((Counter(pred) & Counter(gold)).values())
        if same:
            prec, rec = same / len(pred), same / len(gold)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def degenerate(prediction: str) -> bool:
    """An answer that says nothing: empty (after normalisation), one word four or more times in a row
    ("the Kesh Kesh Kesh Kesh", "no, no, no, no"), or a phrase of two to eight words three or more times
    in a row ("the town of X in the town of X in the town of X in"): a decoding loop. Case, punctuation
    and articles are ignored (SQuAD's normalisation)."""
    words = normalize_answer(prediction).split()
    if not words:
        return True
    for n in range(1, 9):
        times = 4 if n == 1 else 3
        for i in range(len(words) - n * times + 1):
            if all(words[i + k * n:i + (k + 1) * n] == words[i:i + n] for k in range(1, times)):
                return True
    return False


def yes_no(prediction: str) -> str | None:
    """``"yes"`` / ``"no"`` when the (normalised) prediction starts with one of them, else None."""
    words = normalize_answer(prediction).split()
    return words[0] if words and words[0] in ("yes", "no") else None


def paired_ci(a, b, n: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired items (two methods' scores on the same questions) with a percentile
    bootstrap interval that resamples the questions."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_ci: {a.size} scores against {b.size}; pairs need equal lengths")
    return bootstrap_ci(a - b, n, level, seed)


def bootstrap_ci(values, n: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile bootstrap interval over the items (questions) of ``values``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(x.mean()), float(lo), float(hi)
