"""docs/design.md is the design the code cites: every `design.md#<section>` named in the package, the
tests, the docs or the Makefile is a heading there, and nothing cites a design file the repository lacks."""
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
OLD = "CONTRACT" + " §"  # the design file outside the repository that docstrings used to cite
CITING = ["src", "tests", "docs", "experiments", "benchmarks", "Makefile", "README.md"]


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def files():
    for name in CITING:
        path = ROOT / name
        yield from (p for p in path.rglob("*") if p.suffix in (".py", ".md", ".cpp", ".h", ".cu")) \
            if path.is_dir() else [path]


def test_slug_follows_github():
    assert slug("Stage 1: LDA") == "stage-1-lda"
    assert slug("The DoE model") == "the-doe-model"
    assert slug("knowledge_attention") == "knowledge_attention"


def test_every_cited_section_exists():
    design = (ROOT / "docs" / "design.md").read_text()
    anchors = {slug(h) for h in re.findall(r"^#{2,4} (.+)$", design, re.M)}
    cited = {}
    for p in files():
        text = p.read_text(errors="replace")
        assert OLD not in text, f"{p.relative_to(ROOT)} cites a contract the repository does not hold"
        for anchor in re.findall(r"design\.md#([\w-]+)", text):
            cited.setdefault(anchor, p.relative_to(ROOT))
    assert cited, "nothing cites docs/design.md"
    missing = {a: str(p) for a, p in cited.items() if a not in anchors}
    assert not missing, missing
