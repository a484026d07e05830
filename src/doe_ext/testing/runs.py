"""What an ablation trains on and with: a Stage-1-labelled GCIDE corpus (``doe_corpus``) and one
seeded Stage-2 run of a ``DoEForCausalLM`` variant (``train_run``), both cached on disk by their
parameters (``$DOE_EXT_CACHE/ablations``, default ``~/.cache/doe_ext/ablations``), so a re-run only
trains what changed. Sizes come from the ablation scale: ``tiny`` (CI, seconds) or ``small``."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCALES = {
    "tiny": dict(per_domain=40, vocab=400, topics=8, lda_iters=30, steps=12, seq=32, batch=4, width=32),
    "small": dict(per_domain=400, vocab=2000, topics=16, lda_iters=300, steps=300, seq=64, batch=16, width=64),
}
VERSION = 2  # bump when a change of the training code changes results (invalidates the run cache)


def cache_dir() -> Path:
    return Path(os.environ.get("DOE_EXT_CACHE", Path.home() / ".cache" / "doe_ext")) / "ablations"


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class LabelledCorpus:
    """GCIDE definitions, BPE-tokenised, with an LDA topic per token; 90% / 10% train / held-out
    documents; each document's GCIDE domain kept for analysis (the models never see it)."""

    ids: list[np.ndarray]
    topics: list[np.ndarray]
    domains: list[str]
    vocab_size: int
    num_topics: int
    params: dict

    def split(self):
        cut = int(0.9 * len(self.ids))
        return ((self.ids[:cut], self.topics[:cut], self.domains[:cut]),
                (self.ids[cut:], self.topics[cut:], self.domains[cut:]))


def labelled_corpus(scale: str = "tiny", cache: Path | None = None) -> LabelledCorpus:
    s = SCALES[scale]
    params = {k: s[k] for k in ("per_domain", "vocab", "topics", "lda_iters")} | {"version": VERSION}
    path = (cache or cache_dir()) / f"corpus-{_key(params)}.npz"
    if not path.is_file():
        from doe_ext.stage1 import load_gcide_domains, stage1

        docs = load_gcide_domains(per_domain=s["per_domain"])
        with tempfile.TemporaryDirectory() as tmp:
            s1 = stage1(docs, Path(tmp), s["vocab"], s["topics"], s["lda_iters"], progress=False)
        lengths = np.array([len(x) for x in s1.ids])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp_path, tokens=np.concatenate(s1.ids), topics=s1.topic_ids, lengths=lengths,
                 domains=np.array([d for _, d in docs]), vocab_size=s1.tokenizer.get_vocab_size())
        os.replace(tmp_path, path)
    z = np.load(path)
    bounds = np.cumsum(np.concatenate([[0], z["lengths"]]))
    cut = lambda a: [a[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]  # noqa: E731
    return LabelledCorpus(cut(z["tokens"]), cut(z["topics"]), z["domains"].tolist(), int(z["vocab_size"]),
                          s["topics"], params)


TOPICS = ("lda", "random", "none")


def with_topics(split, kind: str, seed: int):
    """A split's topic ids as Stage 1 gave them (``"lda"``), shuffled over all of the split's tokens
    (``"random"``: the same marginal, no relation to the text; seeded) or all -1 (``"none"``)."""
    ids, topics, domains = split
    if kind == "lda":
        return split
    flat = np.concatenate(topics)
    flat = np.random.default_rng(10_000 + seed).permutation(flat) if kind == "random" else np.full_like(flat, -1)
    bounds = np.cumsum([0] + [len(t) for t in topics])
    return ids, [flat[bounds[i]:bounds[i + 1]] for i in range(len(topics))], domains


def by_domain(split, domain: str):
    keep = [i for i, d in enumerate(split[2]) if d == domain]
    return tuple([part[i] for i in keep] for part in split)


def _zero_grad_share(model) -> float | None:
    """Share of knowledge blocks (block FFNs with ``blocks="ffn"``, rows of Z otherwise) or MoE
    experts whose gradient is exactly zero after this backward (Fig. 7); None for a dense model."""
    from doe_ext.analysis import block_gradient_norms

    try:
        norms = block_gradient_norms(model)
    except ValueError:  # no blocks, no experts
        return None
    key = next(k for k in ("moe_experts", "block_ffn", "knowledge_state") if k in norms)
    return float((norms[key] == 0).float().mean())


def seesaw(model, train, heldout, target: str, steps: int, seq: int, batch: int, lr: float = 1e-3) -> dict:
    """DoE Table 14 and Fig. 7 at our scale: continue training ``model`` on one domain only (constant
    ``lr``), held-out NTP loss per domain before and after, and the share of blocks with exactly zero
    gradient at each continued step."""
    from doe_ext.training import batches, eval_windows, heldout_metrics, optimise

    domains = sorted(set(heldout[2]))
    if target not in domains:
        raise ValueError(f"seesaw: `target` must be one of the domains {domains}, got {target!r}")
    windows = {d: eval_windows(by_domain(heldout, d), seq) for d in domains}
    before = {d: heldout_metrics(model, w, batch)["ntp"] for d, w in windows.items()}
    shares = []

    def after_backward(step, out):
        share = _zero_grad_share(model)
        if share is not None:
            shares.append(share)

    optimise(model, batches(*by_domain(train, target), seq, batch, steps, seed=3), steps, lr, one_cycle=False,
             after_backward=after_backward)
    after = {d: heldout_metrics(model, w, batch)["ntp"] for d, w in windows.items()}
    others = [d for d in domains if d != target]
    out = {"target": target, "steps": steps, "before": before, "after": after,
           "target_change": after[target] - before[target],
           "others_change": float(np.mean([after[d] - before[d] for d in others]))}
    if shares:
        out["zero_grad_share"] = float(np.mean(shares))
    return out


def _model_config(corpus: "LabelledCorpus", sizes: dict, config: dict | None) -> dict:
    """The run's model config: the demo's at these sizes with ``config``'s overrides, less those that
    repeat what the run uses anyway (``{"alpha": 0.001}`` and ``{}`` are one run, one cache entry)."""
    from doe_ext.training import model_config
    from doe_ext.models import DoEConfig

    base = model_config(corpus.vocab_size, corpus.num_topics, sizes["seq"], sizes["width"])
    resolved = DoEConfig(**base).to_dict()  # every field's value without overrides
    missing = object()
    return {**base, **{k: v for k, v in (config or {}).items() if resolved.get(k, missing) != v}}


def train_run(corpus: LabelledCorpus, config: dict | None = None, seed: int = 0, scale: str = "tiny",
              steps: int | None = None, cache: Path | None = None, progress: bool = False, topics: str = "lda",
              continue_on: str | None = None, continue_steps: int | None = None, **sizes) -> dict:
    """One seeded Stage-2 run of the demo's model with ``config`` overrides (``knowledge=False``,
    ``router="moe_topk"``, ``alpha=0.01``, ...) on the corpus with its ``topics`` (:func:`with_topics`);
    with ``continue_on`` a domain, then :func:`seesaw` for ``continue_steps`` (default steps // 3).
    Cached by (corpus, config, seed, sizes, topics, continuation). Returns the held-out NTP loss and
    perplexity, the held-out curve (10 points), the training curve, next-topic accuracy (with
    routers), the last utilisation CV per layer, tokens/s, train seconds, parameters and peak RSS
    (:func:`doe_ext.training.train_model`), and ``seesaw`` with a continuation."""
    from doe_ext.training import train_model

    unknown = sorted(set(sizes) - set(SCALES[scale]))
    if unknown:
        raise ValueError(f"train_run: unknown size(s) {unknown}; sizes are {sorted(SCALES[scale])}")
    if topics not in TOPICS:
        raise ValueError(f"train_run: `topics` must be one of {TOPICS}, got {topics!r}")
    s = {**SCALES[scale], **sizes}
    steps = steps or s["steps"]
    continue_steps = (continue_steps or max(1, steps // 3)) if continue_on else None
    cfg = _model_config(corpus, s, config)
    key = _key({"corpus": corpus.params, "config": cfg, "seed": seed, "steps": steps, "seq": s["seq"],
                "batch": s["batch"], "topics": topics, "continue": [continue_on, continue_steps], "version": VERSION})
    path = (cache or cache_dir()) / f"run-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    train, heldout = (with_topics(part, topics, seed) for part in corpus.split())
    result, model, tracker = train_model(train, heldout, cfg, steps, s["seq"], s["batch"], seed=seed,
                                         progress=progress, eval_every=max(1, steps // 10))
    hist = tracker.history
    result["utilisation_cv"] = hist[-1].tolist() if len(hist) else []
    result.update(config=config or {}, seed=seed, steps=steps, topics=topics)
    if continue_on:
        result["seesaw"] = seesaw(model, train, heldout, continue_on, continue_steps, s["seq"], s["batch"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)  # a half-written run is never taken for a whole one
    return result
