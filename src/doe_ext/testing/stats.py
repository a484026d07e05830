"""The statistics of an ablation: per arm the mean and a 95% t-interval over seeds, paired
differences against the control arm (matched by seed), and the verdict on a claim."""
from __future__ import annotations

import math
from dataclasses import dataclass


def t_quantile(level: float, df: int) -> float:
    """The two-sided Student-t quantile ``t_{(1 + level) / 2, df}``."""
    from scipy.stats import t

    return float(t.ppf((1 + level) / 2, df))


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def covers(self, x: float) -> bool:
        return self.low <= x <= self.high

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.4g} (n={self.n})"
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]"


def mean_ci(values: list[float], level: float = 0.95) -> Interval:
    """Mean and t-interval of ``values`` (seeds); with one value the interval is unknown (nan)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci: no values")
    m = sum(values) / n
    if n == 1:
        return Interval(m, math.nan, math.nan, 1)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = t_quantile(level, n - 1) * sd / math.sqrt(n)
    return Interval(m, m - half, m + half, n)


def paired_difference(arm: dict[int, float], control: dict[int, float], level: float = 0.95) -> Interval:
    """``arm - control`` per seed both have, then :func:`mean_ci` of those differences."""
    seeds = sorted(set(arm) & set(control))
    if not seeds:
        raise ValueError("paired_difference: the arm and the control share no seed")
    return mean_ci([arm[s] - control[s] for s in seeds], level)


VERDICTS = ("supported", "contradicted", "inconclusive")


def verdict(diff: Interval, claim: str) -> str:
    """``claim`` is ``"<"`` (the arm is lower than the other) or ``">"``; ``diff`` the paired interval
    of ``arm - other``. Supported when the interval excludes zero on the claimed side, contradicted
    when it excludes zero on the other, inconclusive when it covers zero or is unknown (one seed)."""
    if claim not in ("<", ">"):
        raise ValueError(f'verdict: `claim` must be "<" or ">", got {claim!r}')
    if diff.n < 2 or math.isnan(diff.low) or diff.covers(0.0):
        return "inconclusive"
    lower = diff.high < 0
    return "supported" if lower == (claim == "<") else "contradicted"
