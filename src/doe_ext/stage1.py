"""Stage 1 of DoE on a text corpus (§3.2): a BPE tokenizer trained on it, LDA fitted on its tokens
or words (:mod:`doe_ext.lda`), and a topic id for every token (:func:`stage1`). And the corpus the
demo, the notebooks and the ablation plugin use: the subject-labelled definitions of the GNU
Collaborative International Dictionary of English (Debian's ``dict-gcide``; :func:`load_gcide_domains`)."""
from __future__ import annotations

import gzip
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
DOMAINS = {"Zool.": "zoology", "Bot.": "botany", "Chem.": "chemistry", "Med.": "medicine", "Law": "law",
           "Naut.": "nautical", "Mus.": "music"}
_TAG = re.compile(r"\((" + "|".join(re.escape(t) for t in DOMAINS) + r")\)")
_NOISE = re.compile(r"\[[^\]]*\]|--[A-Z][\w.]*|\\[^\\]*\\|[{}*`\"]")


def load_gcide_domains(path: Path = GCIDE, per_domain: int = 800, min_words: int = 8, seed: int = 0
                       ) -> list[tuple[str, str]]:
    """``[(definition text, domain)]``: each sense tagged with one of :data:`DOMAINS`, balanced to at
    most ``per_domain`` per domain (a seeded sample)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: install Debian's dict-gcide (`apt-get install dict-gcide`; "
                                "`make setup` does it as root)")
    text = gzip.open(path, "rt", encoding="utf-8", errors="replace").read()
    by_domain: dict[str, list[str]] = {d: [] for d in DOMAINS.values()}
    for block in text.split("\n\n"):
        tags = _TAG.findall(block)
        if len(set(tags)) != 1:
            continue
        body = _NOISE.sub(" ", block[block.index("(" + tags[0] + ")") + len(tags[0]) + 2:])
        body = " ".join(body.split())
        if len(body.split()) >= min_words:
            by_domain[DOMAINS[tags[0]]].append(body)
    rng = np.random.default_rng(seed)
    docs = []
    for domain, texts in by_domain.items():
        for i in rng.permutation(len(texts))[:per_domain]:
            docs.append((texts[i], domain))
    order = rng.permutation(len(docs))
    return [docs[i] for i in order]


class WordVocabulary:
    """The vocabulary of word-level LDA: the lower-cased words of the BPE tokenizer's pre-tokenizer,
    numbered in order of first appearance. ``id_to_token`` lets :meth:`doe_ext.lda.LDA.top_tokens`
    print them."""

    def __init__(self):
        self.words: list[str] = [""]  # id 0: a word the fitted model never saw (never in the LDA vocabulary)
        self.index: dict[str, int] = {"": 0}

    def ids(self, words: list[str]) -> list[int]:
        for w in words:
            if w not in self.index:
                self.index[w] = len(self.words)
                self.words.append(w)
        return [self.index[w] for w in words]

    def id_to_token(self, i: int) -> str:
        return self.words[i]

    def __len__(self) -> int:
        return len(self.words)


@dataclass
class Stage1:
    """DoE's Stage 1 on a corpus: the BPE tokenizer, the LDA model and every token's topic.

    ``unit="token"`` fits LDA on the BPE tokens themselves; ``unit="word"`` fits it on whole
    lower-cased words (alphabetic, at least 3 letters, in at most ``max_doc_freq`` of the documents)
    and gives each token the topic of the word it belongs to (a token outside the LDA vocabulary,
    and the leading [BOS], get the document's dominant topic). ``corpus`` is what the LDA was fitted
    on (token or word ids) and ``vocab`` decodes its ids; ``ids`` and ``topics`` are per document."""

    tokenizer: Any
    lda: Any
    unit: str
    corpus: Any
    vocab: Any
    ids: list[np.ndarray]
    topics: list[np.ndarray]
    theta: np.ndarray
    fit_s: float

    @property
    def topic_ids(self) -> np.ndarray:
        return np.concatenate(self.topics)

    def top_words(self, n: int = 8) -> list[list[str]]:
        return self.lda.top_tokens(n, tokenizer=self.vocab)

    def quality(self, domains: list[str], n: int = 10) -> dict:
        """Mean NPMI coherence of the top-``n`` words (on ``corpus``) and the NMI between each
        document's dominant topic and its domain (a label the LDA never saw)."""
        from doe_ext.analysis import normalized_mutual_info

        return {"npmi": float(self.lda.coherence(self.corpus, n=n).mean()),
                "nmi": normalized_mutual_info(self.theta.argmax(1).tolist(), domains)}

    def label(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(token ids, topic ids)]`` of new texts, labelled by the fitted model ([BOS] first)."""
        from doe_ext.lda import TokenCorpus

        ids, units, word_of = _encode(self.tokenizer, texts, self.vocab if self.unit == "word" else None, grow=False)
        size = len(self.vocab) if self.unit == "word" else self.tokenizer.get_vocab_size()
        corpus = TokenCorpus.from_documents(units, vocab_size=size)
        labels, theta = self.lda.label(corpus)
        return list(zip(ids, _token_topics(labels, theta, corpus, word_of)))


def _encode(tok, texts, words: WordVocabulary | None, grow: bool = True):
    """Token ids per text ([BOS] first); the LDA's units (token ids, or word ids with ``words``);
    and per text the index of each token's word (None for token-level LDA)."""
    bos = tok.token_to_id("[BOS]")
    ids, units, word_of = [], [], []
    for text in texts:
        enc = tok.encode(text)
        ids.append(np.array([bos] + enc.ids, dtype=np.int64))
        if words is None:
            units.append(ids[-1])
            word_of.append(None)
            continue
        pre = [w.lower() for w, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
        if not grow:  # unseen words map to an id the LDA never kept (labelled by the document)
            pre = [w if w in words.index else "" for w in pre]  # "" is id 0
        units.append(np.array(words.ids(pre), dtype=np.int64))
        word_of.append(np.array([-1] + [w if w is not None else -1 for w in enc.word_ids], dtype=np.int64))
    return ids, units, word_of


def _token_topics(labels: np.ndarray, theta: np.ndarray, corpus, word_of) -> list[np.ndarray]:
    """Per document: each token's topic (its word's with word-level LDA; [BOS]: the dominant topic)."""
    out = []
    for d, w in enumerate(word_of):
        lo, hi = int(corpus.offsets[d]), int(corpus.offsets[d + 1])
        unit_topics = labels[lo:hi].astype(np.int64)
        if w is None:
            out.append(unit_topics)
            continue
        dominant = int(theta[d].argmax()) if (unit_topics >= 0).any() else -1
        out.append(np.where(w >= 0, unit_topics[np.maximum(w, 0)] if len(unit_topics) else -1, dominant))
    return out


def stage1(docs: list[tuple[str, str]], out: Path, vocab_size: int, num_topics: int, iterations: int,
           unit: str = "word", max_doc_freq: float = 0.1, alpha: float | None = 0.1, seed: int = 0,
           progress: bool = True) -> Stage1:
    """BPE tokenizer (``out/tokenizer.json``), LDA and a topic id for every token (:class:`Stage1`).
    The defaults (word-level LDA, words in <= 10% of the documents, a sparse document prior
    ``alpha=0.1`` for these short definitions; ``None`` is LDA's 50 / K) were chosen by measurement:
    ``ablations/test_stage1.py`` and ``reports/ablations/stage1.md``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from doe_ext.lda import LDA, TokenCorpus

    if unit not in ("token", "word"):
        raise ValueError(f"stage1: `unit` must be 'token' or 'word', got {unit!r}")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator((t for t, _ in docs), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[BOS]"], show_progress=False))
    tok.save(str(out / "tokenizer.json"))
    words = WordVocabulary() if unit == "word" else None
    ids, units, word_of = _encode(tok, [t for t, _ in docs], words)
    if words is None:
        size, exclude = tok.get_vocab_size(), [tok.token_to_id(s) for s in ("[PAD]", "[UNK]", "[BOS]")]
    else:
        size = len(words)
        exclude = [i for i, w in enumerate(words.words) if not (w.isalpha() and len(w) >= 3)]
    corpus = TokenCorpus.from_documents(units, vocab_size=size).write(out / "corpus", overwrite=True)
    lda = LDA(num_topics=num_topics, alpha=alpha, seed=seed)
    t0 = time.perf_counter()
    lda.fit(corpus, iterations=iterations, progress=progress, exclude=exclude, max_doc_freq=max_doc_freq)
    fit_s = time.perf_counter() - t0
    labels, theta = lda.label(corpus)
    return Stage1(tok, lda, unit, corpus, words if words is not None else tok, ids,
                  _token_topics(labels, np.asarray(theta), corpus, word_of), np.asarray(theta), round(fit_s, 2))
