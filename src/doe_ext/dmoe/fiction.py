"""A knowledge set no base model can know: short prose about invented places, devices, people and
events, with questions worded unlike the prose (``fiction-v1``). **Every fact in it is made up.**

Closed book scores 0 on it by construction, so what DMoE's experts carry is measured without the
base's prior. Each document describes one invented entity in five sentences (one fact each, the
sentence shape drawn from several per fact, the subject named or referred to); each fact has one
short answer (a name, a year, a word or two) and questions about it in two disjoint pools of
wordings: ``"train"`` wordings ask about the train split's documents (what a knowledge reader learns
from), ``"dev"`` wordings about the dev split's, so a dev score also measures questions worded as
nothing was trained on. Names are built from syllables by a seeded generator and are unique within
the set.

``generate(seed, train, dev)`` is deterministic; ``freeze(out)`` writes the versioned files shipped
in ``doe_ext/dmoe/data/`` (``python -m doe_ext.dmoe.fiction`` rewrites them, identically).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

NAME = "fiction-v1"
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "sh", "th")
_NUCLEI = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "sh", "m", "k")
_PLACE_ENDS = ("", "", "", "mere", "ford", "holm", "wick", "dale", "port")

# Per kind: facts as (key, value pool, passage sentences, train question wordings, dev question wordings).
# "{s}" is the subject's name, "{v}" the value; a pool of None draws an invented name, "year" a year.
_PLACE = [
    ("river", None,
     ["{s} lies on the banks of the {v} river.", "The {v} river flows through the middle of {s}.",
      "Boats on the {v} river stop at the quays of {s}."],
     ["Which river runs past {s}?", "On what river is {s} built?"],
     ["What is the name of the river at {s}?", "Name the river that {s} stands beside."]),
    ("founded", "year",
     ["{s} was founded in {v}.", "The first houses of {s} were built in {v}.",
      "Settlers arrived at {s} in {v} and never left."],
     ["In what year was {s} founded?", "When did the first settlers come to {s}?"],
     ["What year does {s} date its founding to?", "Since which year has {s} existed?"]),
    ("export", ("salt", "copper", "wool", "glass", "amber", "cedar", "indigo", "cheese", "paper", "tin", "linen",
                "honey", "marble", "saffron", "rope"),
     ["{s} grew rich by selling {v}.", "Most of the {v} sold in the region comes from {s}.",
      "The main trade of {s} is {v}."],
     ["What does {s} mostly sell?", "Which good made {s} wealthy?"],
     ["What is {s} best known for trading?", "Which product is the chief export of {s}?"]),
    ("founder", None,
     ["{s} was founded by a surveyor called {v}.", "A statue of its founder, {v}, stands in the square of {s}.",
      "The town of {s} owes its charter to {v}."],
     ["Who founded {s}?", "Which person established {s}?"],
     ["Who is remembered as the founder of {s}?", "Whose statue honours the founding of {s}?"]),
    ("neighbour", None,
     ["{s} is a day's walk from the village of {v}.", "The nearest town to {s} is {v}.",
      "A stone road joins {s} to its neighbour {v}."],
     ["Which town is closest to {s}?", "What village neighbours {s}?"],
     ["Name the town next to {s}.", "Which settlement lies nearest to {s}?"]),
]
_DEVICE = [
    ("inventor", None,
     ["The {s} was invented by {v}.", "{v} built the first {s} in a small workshop.",
      "The {s} is the work of the engineer {v}."],
     ["Who invented the {s}?", "Which engineer designed the {s}?"],
     ["Who was the creator of the {s}?", "Whose invention is the {s}?"]),
    ("purpose", ("grinding lenses", "weaving rope", "pumping water", "sorting letters", "measuring rainfall",
                 "cutting marble", "printing maps", "drying tea", "winding clocks", "spinning silk",
                 "pressing olives", "sharpening blades"),
     ["The {s} is used for {v}.", "Workshops use the {s} for {v}.", "The {s} was made for {v}."],
     ["What is the {s} for?", "What job does the {s} do?"],
     ["What task was the {s} designed to perform?", "For what work is the {s} meant?"]),
    ("power", ("steam", "wind", "clockwork", "falling water", "horses", "the tides", "sunlight", "a treadle"),
     ["The {s} runs on {v}.", "The {s} is driven by {v}.", "The power for the {s} comes from {v}."],
     ["What powers the {s}?", "What makes the {s} move?"],
     ["What is the source of the {s}'s power?", "By what means is the {s} driven?"]),
    ("town", None,
     ["The first {s} was built in the town of {v}.", "The {s} comes from the workshops of {v}.",
      "{v} is where the {s} was first made."],
     ["In which town was the {s} first made?", "Where was the first {s} built?"],
     ["Which town is the {s} from?", "Name the town where the {s} originated."]),
    ("year", "year",
     ["The {s} was finished in {v}.", "The first {s} began to work in {v}.", "In {v} the {s} was shown to the public."],
     ["In what year was the {s} completed?", "When did the {s} first work?"],
     ["What year did the {s} appear?", "When was the {s} first presented?"]),
]
_PERSON = [
    ("profession", ("cartographer", "glassblower", "astronomer", "beekeeper", "luthier", "ferry captain",
                    "bookbinder", "stonemason", "botanist", "clockmaker", "weaver", "potter"),
     ["{s} worked as a {v}.", "By trade, {s} was a {v}.", "{s} earned a living as a {v}."],
     ["What was the trade of {s}?", "What did {s} do for a living?"],
     ["What was {s}'s profession?", "Which occupation did {s} follow?"]),
    ("hometown", None,
     ["{s} was born in the town of {v}.", "{s} grew up in {v}.", "The birthplace of {s} is {v}."],
     ["Where was {s} born?", "Which town did {s} come from?"],
     ["What is the hometown of {s}?", "In which town did {s} spend childhood?"]),
    ("instrument", ("the lute", "the oboe", "the harp", "the fiddle", "the flute", "the drum", "the bagpipe",
                    "the zither", "the horn", "the cello"),
     ["In the evenings {s} played {v}.", "{s} was also known for playing {v}.", "{s} learned {v} as a child."],
     ["Which instrument did {s} play?", "What did {s} play in the evenings?"],
     ["What musical instrument was {s} known for?", "Name the instrument {s} could play."]),
    ("born", "year",
     ["{s} was born in {v}.", "{s} came into the world in {v}.", "The year {s} was born was {v}."],
     ["In what year was {s} born?", "When was {s} born?"],
     ["What is the birth year of {s}?", "Which year saw the birth of {s}?"]),
    ("teacher", None,
     ["{s} was taught by {v}.", "{s} learned the craft from {v}.", "As a young apprentice, {s} studied under {v}."],
     ["Who taught {s}?", "Under whom did {s} study?"],
     ["Who was the teacher of {s}?", "Which master trained {s}?"]),
]
_EVENT = [
    ("town", None,
     ["The {s} is held every year in {v}.", "Each year the people of {v} hold the {s}.",
      "Visitors travel to {v} for the {s}."],
     ["Where does the {s} take place?", "In which town is the {s} held?"],
     ["Which town hosts the {s}?", "Where do people go to attend the {s}?"]),
    ("month", ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
               "November", "December"),
     ["The {s} takes place in {v}.", "Every {v} the {s} begins.", "The {s} falls in the month of {v}."],
     ["In which month is the {s}?", "When in the year does the {s} happen?"],
     ["What month is the {s} held in?", "During which month does the {s} take place?"]),
    ("honours", ("the first harvest", "a lighthouse keeper", "the river spirits", "the winter stars",
                 "a drowned bell", "the old bridge", "the returning geese", "a lost ship"),
     ["The {s} honours {v}.", "The {s} is a celebration of {v}.", "People hold the {s} in memory of {v}."],
     ["What does the {s} honour?", "What is celebrated at the {s}?"],
     ["In honour of what is the {s} held?", "What is the {s} a celebration of?"]),
    ("food", ("plum cake", "smoked eel", "barley bread", "honey wine", "roasted chestnuts", "pickled herring",
              "sweet buns", "lentil soup", "apple pie", "goat cheese"),
     ["At the {s} everyone eats {v}.", "The dish of the {s} is {v}.", "No {s} is complete without {v}."],
     ["What is eaten at the {s}?", "Which food belongs to the {s}?"],
     ["What dish is served at the {s}?", "What do people eat during the {s}?"]),
    ("founder", None,
     ["The {s} was started by {v}.", "{v} held the first {s}.", "The first {s} was organised by {v}."],
     ["Who started the {s}?", "Who organised the first {s}?"],
     ["Who founded the {s}?", "Who was behind the first {s}?"]),
]
KINDS = {"place": _PLACE, "device": _DEVICE, "person": _PERSON, "event": _EVENT}
_DEVICE_WORDS = ("loom", "engine", "press", "pump", "lathe", "mill", "frame", "wheel")
_EVENT_WORDS = ("Festival", "Fair", "Night", "Procession", "Feast", "Games")
_PERSON_TITLES = ("", "", "Master ", "Captain ", "Doctor ")


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def _sentence_case(s: str) -> str:
    return s[0].upper() + s[1:]


def generate(seed: int = 0, train: int = 160, dev: int = 40, dev_questions: int = 2) -> tuple[list[dict], list[dict]]:
    """``train + dev`` documents (kinds in rotation, train first) as ``(docs, questions)`` lines of the
    frozen files: a question on each fact of a train document (a knowledge reader's supervision), on
    ``dev_questions`` of a dev document's five. Deterministic in ``seed``."""
    if train < 0 or dev < 0 or not 1 <= dev_questions <= 5:
        raise ValueError(f"fiction.generate: `train` and `dev` must be >= 0 and `dev_questions` in [1, 5], got "
                         f"train={train}, dev={dev}, dev_questions={dev_questions}")
    rng = random.Random(seed)
    used: set[str] = set()

    def name(syllables: int) -> str:
        while True:
            w = _word(rng, syllables)
            if w.lower() not in used and 4 <= len(w) <= 9:
                used.add(w.lower())
                return w

    def person() -> str:
        return f"{name(2)} {name(2)}"

    def place() -> str:
        while True:
            w = _word(rng, 2) + rng.choice(_PLACE_ENDS)
            if w.lower() not in used and 4 <= len(w) <= 11:
                used.add(w.lower())
                return w

    docs, qs = [], []
    kinds = list(KINDS)
    for n in range(train + dev):
        split = "train" if n < train else "dev"
        kind = kinds[n % len(kinds)]
        subject = {"place": lambda: place(), "person": lambda: rng.choice(_PERSON_TITLES) + person(),
                   "device": lambda: f"{name(2)} {rng.choice(_DEVICE_WORDS)}",
                   "event": lambda: f"{name(2)} {rng.choice(_EVENT_WORDS)}"}[kind]()
        sentences, facts = [], []
        for key, pool, shapes, train_q, dev_q in KINDS[kind]:
            if pool is None:
                value = person() if key in ("founder", "inventor", "teacher") else place()
            elif pool == "year":
                value = str(rng.randint(1420, 1890))
            else:
                value = rng.choice(pool)
            sentences.append(_sentence_case(rng.choice(shapes).format(s=subject, v=value)))
            facts.append((key, value, train_q if split == "train" else dev_q))
        rest = list(range(1, len(sentences)))  # the first sentence stays first; the others in a seeded order
        rng.shuffle(rest)
        text = " ".join(sentences[i] for i in [0] + rest)
        doc_id = f"fiction-{n:04d}"
        docs.append({"id": doc_id, "title": subject, "text": text, "kind": kind, "split": split})
        asked = range(len(facts)) if split == "train" else sorted(rng.sample(range(len(facts)), dev_questions))
        for j in asked:
            key, value, wordings = facts[j]
            answers = [value] + ([value[4:]] if value.startswith("the ") else [])
            qs.append({"question": rng.choice(wordings).format(s=subject), "answers": answers, "doc_id": doc_id,
                       "kind": f"{kind}.{key}", "split": split})
    return docs, qs


def freeze(out: str | Path, seed: int = 0) -> None:
    """Write ``fiction-v1.docs.jsonl`` and ``fiction-v1.qa.jsonl`` (the shipped set: seed 0, 160 train
    documents with 800 questions, 40 dev documents with 80)."""
    docs, qs = generate(seed)
    out = Path(out)
    for suffix, rows in (("docs", docs), ("qa", qs)):
        (out / f"{NAME}.{suffix}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


if __name__ == "__main__":
    from doe_ext.dmoe.data import DATA

    freeze(DATA)
