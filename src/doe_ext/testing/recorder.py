"""The ablation recorder (docs/design.md#ablations): arms, seeds, metrics and claims; writes
``<dir>/<name>.{json,md,png}`` with per-arm means and 95% intervals over seeds, paired differences
against the control arm, and each claim's verdict beside the paper's number."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from doe_ext.testing.stats import Interval, mean_ci, paired_difference, verdict

_CLAIM = re.compile(r"^\s*([\w.\-+/ ]+?)\s*([<>])\s*([\w.\-+/ ]+?)\s*$")


@dataclass(frozen=True)
class Claim:
    """``left op right`` on ``metric`` (``op``: ``<`` or ``>``), with the paper's number as text."""

    left: str
    op: str
    right: str
    metric: str
    paper: str = ""

    @classmethod
    def parse(cls, text: str, metric: str, paper: str = "") -> "Claim":
        m = _CLAIM.match(text)
        if not m:
            raise ValueError(f'ablation.expect: a claim reads "<arm> < <arm>" or "<arm> > <arm>", got {text!r}')
        return cls(m.group(1), m.group(2), m.group(3), metric, paper)

    def __str__(self) -> str:
        return f"{self.left} {self.op} {self.right} on {self.metric}"


class Ablation:
    """One table of a paper: ``record(arm, seed, **metrics)`` per training run, ``expect(...)`` per claim.

    Args:
        name: the table's file name (``reports/ablations/<name>.*``).
        control: the arm the paired differences are taken against.
        title: a heading (e.g. "DoE Table 3: router").
        notes: markdown shown under the table (what the arms are, how a metric is defined).
    """

    def __init__(self, name: str, control: str | None = None, title: str = "", notes: str = ""):
        if not re.fullmatch(r"[\w.\-]+", name):
            raise ValueError(f"ablation: `name` must be a file-name stem (letters, digits, _ . -), got {name!r}")
        self.name, self.control, self.title, self.notes = name, control, title or name, notes
        self.runs: dict[str, dict[int, dict[str, float]]] = {}
        self.claims: list[Claim] = []

    def record(self, arm: str, seed: int, **metrics: float) -> None:
        if not metrics:
            raise ValueError(f"ablation {self.name}: record({arm!r}, {seed}) got no metrics")
        bad = {k: v for k, v in metrics.items() if not isinstance(v, (int, float)) or v != v}
        if bad:
            raise ValueError(f"ablation {self.name}: arm {arm!r} seed {seed}: metrics must be finite numbers, got {bad}")
        self.runs.setdefault(arm, {}).setdefault(int(seed), {}).update({k: float(v) for k, v in metrics.items()})

    def expect(self, claim: str, metric: str, paper: str = "") -> Claim:
        """State a claim (stated again by every arm's test: kept once)."""
        c = Claim.parse(claim, metric, paper)
        if c not in self.claims:
            self.claims.append(c)
        return c

    def values(self, arm: str, metric: str) -> dict[int, float]:
        return {s: m[metric] for s, m in self.runs.get(arm, {}).items() if metric in m}

    def missing(self) -> list[str]:
        """What a claim or the control needs and no run gave (a run with no numbers is a failure)."""
        out = []
        for c in self.claims:
            for arm in (c.left, c.right):
                if not self.values(arm, c.metric):
                    out.append(f"{self.name}: no `{c.metric}` for arm {arm!r} (claim {c})")
        if self.control is not None and self.runs and self.control not in self.runs:
            out.append(f"{self.name}: the control arm {self.control!r} has no runs")
        return out

    def result(self) -> dict:
        metrics = sorted({k for seeds in self.runs.values() for m in seeds.values() for k in m})
        arms = {arm: {m: _iv(mean_ci(list(self.values(arm, m).values()))) for m in metrics if self.values(arm, m)}
                for arm in self.runs}
        paired = {}
        if self.control in self.runs:
            for arm in self.runs:
                if arm != self.control:
                    paired[arm] = {m: _iv(paired_difference(self.values(arm, m), self.values(self.control, m)))
                                   for m in metrics if set(self.values(arm, m)) & set(self.values(self.control, m))}
        claims = []
        for c in self.claims:
            left, right = self.values(c.left, c.metric), self.values(c.right, c.metric)
            diff = paired_difference(left, right) if set(left) & set(right) else None
            claims.append({"claim": str(c), "paper": c.paper, "difference": None if diff is None else _iv(diff),
                           "verdict": "no data" if diff is None else verdict(diff, c.op)})
        return {"name": self.name, "title": self.title, "notes": self.notes, "control": self.control,
                "seeds": {arm: sorted(s) for arm, s in self.runs.items()}, "arms": arms,
                "paired_vs_control": paired, "claims": claims, "runs": self.runs}

    def write(self, directory: str | Path, scale: str | None = None) -> list[Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        r = self.result() | {"scale": scale}
        js, md = directory / f"{self.name}.json", directory / f"{self.name}.md"
        js.write_text(json.dumps(r, indent=1))
        md.write_text(markdown(r))
        paths = [js, md]
        if r["arms"]:
            paths.append(plot(r, directory / f"{self.name}.png"))
        return paths

    def _repr_html_(self) -> str:
        import html

        return "<pre>" + html.escape(markdown(self.result())) + "</pre>"


def _iv(i: Interval) -> dict:
    return {"mean": i.mean, "low": None if i.n < 2 else i.low, "high": None if i.n < 2 else i.high, "n": i.n}


def _fmt(d: dict | None) -> str:
    if d is None:
        return "–"
    return f"{d['mean']:.4g}" + (f" [{d['low']:.4g}, {d['high']:.4g}]" if d["low"] is not None else f" (n={d['n']})")


def markdown(r: dict) -> str:
    metrics = sorted({m for a in r["arms"].values() for m in a})
    scale = f" Scale `{r['scale']}`." if r.get("scale") else ""
    lines = [f"# {r['title']}", "", f"Mean and 95% t-interval over seeds; control arm: `{r['control']}`.{scale}", "",
             "| arm | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for arm, ms in r["arms"].items():
        lines.append(f"| {arm} | {len(r['seeds'][arm])} | " + " | ".join(_fmt(ms.get(m)) for m in metrics) + " |")
    if r["paired_vs_control"]:
        lines += ["", f"Paired differences (arm − `{r['control']}`, same seeds):", "",
                  "| arm | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        lines += [f"| {arm} | " + " | ".join(_fmt(d.get(m)) for m in metrics) + " |"
                  for arm, d in r["paired_vs_control"].items()]
    if r["claims"]:
        lines += ["", "| claim | paper | difference (left − right) | verdict |", "|---|---|---|---|"]
        lines += [f"| {c['claim']} | {c['paper'] or '–'} | {_fmt(c['difference'])} | **{c['verdict']}** |"
                  for c in r["claims"]]
    if r.get("notes"):
        lines += ["", r["notes"]]
    return "\n".join(lines) + "\n"


def _arm_of(r: dict, arm: str, metric: str) -> str:
    return _fmt(r["arms"].get(arm, {}).get(metric))


def write_index(directory: str | Path) -> Path:
    """``directory/README.md``: every table written there (``*.json``), each claim with the paper's
    number, both arms (mean and 95% interval), the paired difference and the verdict, and the summed
    training seconds of the runs behind the table (``train_s`` records; cached runs count as run)."""
    directory = Path(directory)
    tables = []
    for path in sorted(directory.glob("*.json")):
        try:
            r = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and {"name", "arms", "claims"} <= set(r):
            tables.append(r)
    lines = ["# Ablations", "", "Written by the `doe_ext` pytest plugin (`make ablate`; `ablations/`). Per claim: the paper's "
             "number, ours per arm (mean and 95% t-interval over seeds), the paired difference over seeds and the "
             "verdict (inconclusive when the interval of the difference covers zero).", "",
             "| table | scale | seeds | claim | paper | left arm | right arm | difference | verdict | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in tables:
        seeds = max((len(s) for s in r["seeds"].values()), default=0)
        train_s = sum(m.get("train_s", 0.0) for arm in r["runs"].values() for m in arm.values())
        for c in r["claims"] or [{"claim": "(no claim)", "paper": "", "difference": None, "verdict": "–"}]:
            left, right, metric = _claim_parts(c["claim"])
            lines.append(f"| [{r['title']}]({r['name']}.md) | {r.get('scale') or '–'} | {seeds} | {c['claim']} | "
                         f"{c['paper'] or '–'} | {_arm_of(r, left, metric)} | {_arm_of(r, right, metric)} | "
                         f"{_fmt(c['difference'])} | **{c['verdict']}** | {train_s:.0f} |")
    out = directory / "README.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def _claim_parts(text: str) -> tuple[str, str, str]:
    claim, _, metric = text.rpartition(" on ")
    m = _CLAIM.match(claim)
    return (m.group(1), m.group(3), metric) if m else ("", "", metric)


def plot(r: dict, path: Path) -> Path:
    """One panel per metric: each arm's mean with its 95% interval."""
    from matplotlib.figure import Figure

    metrics = sorted({m for a in r["arms"].values() for m in a})
    fig = Figure(figsize=(3.2 * len(metrics) + 1, 3.2))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, m in zip(axes, metrics):
        arms = [a for a in r["arms"] if m in r["arms"][a]]
        ivs = [r["arms"][a][m] for a in arms]
        err = [[0 if i["low"] is None else i["mean"] - i["low"] for i in ivs],
               [0 if i["high"] is None else i["high"] - i["mean"] for i in ivs]]
        ax.errorbar(range(len(arms)), [i["mean"] for i in ivs], yerr=err, fmt="o", capsize=4)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        ax.set_title(m, fontsize=9)
    fig.suptitle(r["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
