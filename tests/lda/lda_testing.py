"""Test helpers: corpora drawn from LDA's own generative process (DoE App. A.2), so the true
topics are known. (A module of its own, not conftest.py: tests/conftest.py owns that name.)"""
from __future__ import annotations

import dataclasses

import numpy as np

from doe_ext.lda import TokenCorpus


@dataclasses.dataclass
class Planted:
    corpus: TokenCorpus
    phi: np.ndarray  # [K, V] true topic-word distributions
    theta: np.ndarray  # [D, K] true document mixtures
    z: np.ndarray  # [N] true per-token topics


def draw_corpus(num_topics=8, vocab=400, docs=300, length=80, alpha=0.1, eta=0.05, seed=0,
                extra_ids=0) -> Planted:
    """theta_d ~ Dir(alpha), z ~ Mult(theta_d), w ~ Mult(phi_z), phi_k ~ Dir(eta) over ``vocab`` ids.
    ``extra_ids`` more ids (>= vocab) exist in the vocabulary but are not drawn by any topic."""
    rng = np.random.default_rng(seed)
    phi = rng.dirichlet(np.full(vocab, eta), num_topics)
    theta = rng.dirichlet(np.full(num_topics, alpha), docs)
    cdf_t = np.cumsum(theta, axis=1)
    u = rng.random((docs, length))
    z = np.minimum((u[..., None] > cdf_t[:, None, :]).sum(-1), num_topics - 1).reshape(-1)
    w = np.empty_like(z)
    cdf_w = np.cumsum(phi, axis=1)
    for k in range(num_topics):
        sel = z == k
        w[sel] = np.minimum(np.searchsorted(cdf_w[k], rng.random(sel.sum()), side="right"), vocab - 1)
    offsets = np.arange(docs + 1, dtype=np.int64) * length
    corpus = TokenCorpus.from_arrays(w, offsets, vocab + extra_ids)
    return Planted(corpus, phi, theta, z)


def match_topics(est: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one matching of estimated to true topics by cosine similarity.
    Returns (match[k_true] = k_est, cosine of each matched pair)."""
    a = est / np.linalg.norm(est, axis=1, keepdims=True)
    b = true / np.linalg.norm(true, axis=1, keepdims=True)
    cos = b @ a.T  # [K_true, K_est]
    match = np.full(len(true), -1)
    sims = np.zeros(len(true))
    c = cos.copy()
    for _ in range(len(true)):
        i, j = np.unravel_index(np.argmax(c), c.shape)
        match[i], sims[i] = j, cos[i, j]
        c[i, :] = -np.inf
        c[:, j] = -np.inf
    return match, sims
