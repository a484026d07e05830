"""The DMoE evaluation's knowledge: Debian package records frozen into a versioned file.

Knowledge units are package records of the Debian archive (what ``apt-cache dumpavail`` prints:
name, section, maintainer, homepage, one-line description), facts no small LM has memorised. Each
becomes one passage (our sentence template around Debian's field values) and one question whose
short answer is a field value. The question templates are used for evaluation only: nothing in expert
construction sees them (``augment="model"`` lets the base write its own QA pairs from the passage).

``freeze(out)`` writes ``<name>.docs.jsonl`` and ``<name>.qa.jsonl`` from this machine's package lists,
with a deterministic sample (by a seeded hash of the package name), so results do not drift with the
lists; ``load(name)`` reads a frozen set shipped in ``doe_ext/dmoe/data/``.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

DATA = Path(__file__).with_name("data")
QUESTION_KINDS = ("maintainer", "section", "homepage", "section_yes_no")


def read_jsonl(path: str | Path):
    """``(line number, object)`` for each non-blank line of a JSON-lines file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None


def debian_records(n: int | None = None) -> list[dict[str, str]]:
    """Package records of the machine's package lists (``apt-cache dumpavail``), in the lists' order."""
    out = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    recs = []
    for rec in out.split("\n\n"):
        f = dict(re.findall(r"^([A-Za-z-]+): (.*)$", rec, re.M))
        if "Package" in f and "Description" in f:
            recs.append(f)
            if n is not None and len(recs) >= n:
                break
    return recs


def maintainer_name(field: str) -> str:
    """``"Debian Games Team <pkg-games@...>"`` -> ``"Debian Games Team"``."""
    return re.sub(r"\s*<[^>]*>\s*$", "", field).strip()


def passage(f: dict[str, str]) -> str:
    """One record as a passage (our template; the values are Debian's)."""
    text = (f"{f['Package']} is a Debian package in the section {f.get('Section', 'unknown')}, maintained by "
            f"{maintainer_name(f.get('Maintainer', 'unknown'))}. {f['Description']}.")
    return text + (f" Its homepage is {f['Homepage']}." if f.get("Homepage") else "")


def _h(seed: int, s: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{s}".encode()).digest()[:8], "little")


def question(f: dict[str, str], kind: str, other_section: str) -> dict:
    """An evaluation question about record ``f`` with its gold answers."""
    p = f["Package"]
    if kind == "maintainer":
        return {"question": f"Who is listed as the maintainer of the Debian package {p}?",
                "answers": [maintainer_name(f["Maintainer"])]}
    if kind == "section":
        s = f["Section"]
        return {"question": f"In which archive section does Debian place the package {p}?",
                "answers": list(dict.fromkeys([s, s.split("/")[-1]]))}
    if kind == "homepage":
        url = f["Homepage"]
        bare = re.sub(r"^https?://", "", url).rstrip("/")
        return {"question": f"What is the homepage URL of the Debian package {p}?",
                "answers": list(dict.fromkeys([url, url.rstrip("/"), bare]))}
    yes = _h(1, p) % 2 == 0
    s = f["Section"] if yes else other_section
    return {"question": f"Is the Debian package {p} in the archive section {s}?", "answers": ["yes" if yes else "no"],
            "yes_no": True}


def freeze(out: str | Path, name: str = "debian-packages-v1", n: int = 400, dev: int = 100, seed: int = 0) -> None:
    """Sample ``n`` complete records (maintainer, section, homepage, description), write their passages and
    one question each (kinds in rotation); the first ``dev`` questions form the tuning split ("dev"),
    the rest the test split."""
    recs = [f for f in debian_records() if all(f.get(k) for k in ("Maintainer", "Section", "Homepage"))]
    recs = list({f["Package"]: f for f in recs}.values())
    recs.sort(key=lambda f: _h(seed, f["Package"]))
    recs = recs[:n]
    sections = sorted({f["Section"] for f in recs})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{name}.docs.jsonl").open("w") as d, (out / f"{name}.qa.jsonl").open("w") as q:
        for i, f in enumerate(recs):
            d.write(json.dumps({"id": f["Package"], "text": passage(f)}, ensure_ascii=False) + "\n")
            kind = QUESTION_KINDS[i % len(QUESTION_KINDS)]
            others = [s for s in sections if s != f["Section"]]
            qa = question(f, kind, others[_h(seed, f["Package"] + "s") % len(others)])
            q.write(json.dumps({**qa, "doc_id": f["Package"], "kind": kind, "split": "dev" if i < dev else "test"},
                               ensure_ascii=False) + "\n")


def load(name: str = "debian-packages-v1", split: str | None = None) -> tuple[list[dict], list[dict]]:
    """A frozen set shipped with the package: (documents, questions of ``split`` or all)."""
    docs = [d for _, d in read_jsonl(DATA / f"{name}.docs.jsonl")]
    qa = [q for _, q in read_jsonl(DATA / f"{name}.qa.jsonl")]
    return docs, [q for q in qa if split is None or q["split"] == split]


if __name__ == "__main__":
    freeze(DATA)
