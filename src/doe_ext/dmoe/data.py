"""The DMoE evaluation's knowledge, frozen into versioned files: Debian package records
(``debian-packages-v1``, structured) and Debian changelog entries (``debian-changelogs-v1``, prose).

Knowledge units are package records of the Debian archive (what ``apt-cache dumpavail`` prints:
name, section, maintainer, homepage, one-line description), facts no small LM has memorised. Each
becomes one passage (our sentence template around Debian's field values) and one question whose
short answer is a field value. The question templates are used for evaluation only: nothing in expert
construction sees them (``augment="model"`` lets the base write its own QA pairs from the passage).

``freeze(out)`` writes ``<name>.docs.jsonl`` and ``<name>.qa.jsonl`` from this machine's package lists,
with a deterministic sample (by a seeded hash of the package name), so results do not drift with the
lists; ``load(name)`` reads a frozen set shipped in ``doe_ext/dmoe/data/``.

The changelog set (:func:`freeze_changelogs`): each knowledge unit is one entry of a
``/usr/share/doc/*/changelog.Debian.gz`` dated after both bases' training data (from 2024-09-01 on),
its text as the maintainer wrote it; the questions ask, in wordings the changelog format does not use,
who signed the upload, which suite it targeted, and (where the entry names exactly one) which CVE it
fixes and which Debian bug it closes. Dev and test are split by source package, so no source has
entries on both sides.
"""
from __future__ import annotations

import hashlib
import json
import random
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


_HEAD = re.compile(r"^(\S+) \(([^)]+)\) ([^;]+); urgency=(\w+)")
_TRAIL = re.compile(r"^ -- (.+?) <([^>]*)>\s+(.+)$")
CHANGELOG_KINDS = ("uploader", "suite", "cve", "bug")


def changelog_entries(path: str | Path) -> list[dict]:
    """The entries of one ``changelog.Debian.gz``: source, version, suite, urgency, body lines, signer, date."""
    import gzip

    out, cur = [], None
    for line in gzip.open(path, "rt", errors="replace").read().splitlines():
        m = _HEAD.match(line)
        if m:
            cur = {"source": m[1], "version": m[2], "suite": m[3].strip(), "urgency": m[4], "body": []}
            continue
        m = _TRAIL.match(line)
        if m and cur is not None:
            out.append({**cur, "signer": m[1].strip(), "date": m[3].strip(), "file": str(path)})
            cur = None
        elif cur is not None:
            cur["body"].append(line)
    return out


def changelog_text(e: dict, max_chars: int = 1500) -> str:
    """An entry as its changelog shows it (the body cut to ``max_chars``, at a line)."""
    body, n = [], 0
    for line in (x.rstrip() for x in e["body"]):
        if n + len(line) > max_chars:
            body.append("  [...]")
            break
        body.append(line)
        n += len(line) + 1
    while body and not body[0].strip():
        body.pop(0)
    while body and not body[-1].strip():
        body.pop()
    return (f"{e['source']} ({e['version']}) {e['suite']}; urgency={e['urgency']}\n\n" + "\n".join(body)
            + f"\n\n -- {e['signer']}  {e['date']}")


def changelog_questions(e: dict) -> list[dict]:
    """The evaluation questions about one entry (worded unlike the changelog's own lines)."""
    what = f"{e['source']} {e['version']}"
    qs = [{"question": f"Which person signed the upload of {what}?", "answers": [e["signer"]], "kind": "uploader"},
          {"question": f"Which Debian suite was the {what} upload meant for?", "answers": [e["suite"]], "kind": "suite"}]
    body = "\n".join(e["body"])
    cves = sorted(set(re.findall(r"CVE-\d{4}-\d{4,}", body)))
    if len(cves) == 1:
        qs.append({"question": f"Which security vulnerability identifier does {what} address?", "answers": cves,
                   "kind": "cve"})
    bugs = sorted(set(re.findall(r"#(\d{5,7})\b", body)))
    if len(bugs) == 1:
        qs.append({"question": f"What is the number of the Debian bug report that {what} resolves?",
                   "answers": [bugs[0], "#" + bugs[0]], "kind": "bug"})
    return qs


def freeze_changelogs(out: str | Path, name: str = "debian-changelogs-v1", since: str = "2024-09-01",
                      dev_share: float = 0.25, test_questions: int = 300, seed: int = 0,
                      root: str = "/usr/share/doc") -> dict:
    """Every changelog entry dated ``since`` or later (one per source and version), as documents with
    their questions; sources are split into dev (a seeded ``dev_share`` of them) and test, and the test
    split keeps its first ``test_questions`` questions (in the seeded order; every document stays in
    the bank)."""
    import datetime
    from email.utils import parsedate_to_datetime

    cut = datetime.datetime.fromisoformat(since).replace(tzinfo=datetime.timezone.utc)
    found: dict[tuple[str, str], dict] = {}
    for path in sorted(Path(root).glob("*/changelog.Debian.gz")):
        for e in changelog_entries(path):
            try:
                d = parsedate_to_datetime(e["date"])
            except (TypeError, ValueError):
                continue
            if (d if d.tzinfo else d.replace(tzinfo=datetime.timezone.utc)) >= cut:
                found.setdefault((e["source"], e["version"]), e)
    entries = sorted(found.values(), key=lambda e: (_h(seed, e["source"]), e["version"]))
    sources = sorted({e["source"] for e in entries}, key=lambda x: _h(seed, x))
    dev = set(sources[:round(dev_share * len(sources))])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = {"dev": 0, "test": 0}
    with (out / f"{name}.docs.jsonl").open("w") as d, (out / f"{name}.qa.jsonl").open("w") as q:
        for e in entries:
            doc_id = f"{e['source']}_{e['version']}".replace("/", "_")
            d.write(json.dumps({"id": doc_id, "title": f"{e['source']} {e['version']}", "text": changelog_text(e),
                                "source": e["file"]}, ensure_ascii=False) + "\n")
            split = "dev" if e["source"] in dev else "test"
            for qa in changelog_questions(e):
                if split == "test" and n["test"] >= test_questions:
                    break
                q.write(json.dumps({**qa, "doc_id": doc_id, "split": split}, ensure_ascii=False) + "\n")
                n[split] += 1
    return {"documents": len(entries), "sources": len(sources), "questions": n}


def load(name: str = "debian-packages-v1", split: str | None = None) -> tuple[list[dict], list[dict]]:
    """A frozen set shipped with the package: (documents, questions of ``split`` or all)."""
    docs = [d for _, d in read_jsonl(DATA / f"{name}.docs.jsonl")]
    qa = [q for _, q in read_jsonl(DATA / f"{name}.qa.jsonl")]
    return docs, [q for q in qa if split is None or q["split"] == split]


def sample(questions: list[dict], n: int | None, seed: int = 0) -> list[dict]:
    """A seeded sample of ``n`` questions in their file order (all of them when ``n`` is None)."""
    if n is None or n >= len(questions):
        return list(questions)
    keep = set(random.Random(seed).sample(range(len(questions)), n))
    return [q for i, q in enumerate(questions) if i in keep]


def shots(dev: list[dict], docs: dict[str, str]) -> list[tuple[str, str, str]]:
    """The first dev question of each kind, with its passage: the evaluation's demonstrations."""
    first: dict[str, dict] = {}
    for q in dev:
        first.setdefault(q["kind"], q)
    return [(q["question"], q["answers"][0], docs[q["doc_id"]]) for q in first.values()]


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["changelogs"]:
        print(freeze_changelogs(DATA))
    else:
        freeze(DATA)
