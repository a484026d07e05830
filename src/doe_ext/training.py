"""The DoE Stage-2 training loop, one for the demo, the ablation runs (:mod:`doe_ext.testing.runs`)
and users: a seeded stream of fixed-length windows (:func:`batches`), AdamW with a one-cycle or
constant learning rate (:func:`optimise`), held-out next-token loss over every held-out token
(:func:`eval_windows`, :func:`heldout_metrics`), and one seeded run of a ``DoEForCausalLM`` with all its
measurements (:func:`train_model`).

A split is ``(ids, topics, domains)``: per document its token ids and per-token topic ids (numpy
arrays) and a domain label (only the analyses read it)."""
from __future__ import annotations

import math
import time
from collections import Counter

import numpy as np
import torch
from tqdm.auto import tqdm


def batches(ids, topics, domains, seq: int, batch: int, steps: int, seed: int):
    """Fixed-length windows (documents joined, each starting with [BOS]); the same stream for every model."""
    flat = np.concatenate(ids)
    flat_t = np.concatenate(topics)
    flat_d = np.concatenate([[d] * len(x) for x, d in zip(ids, domains)])
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(flat) - seq - 1, batch)
        yield (torch.from_numpy(np.stack([flat[s:s + seq] for s in starts]).astype(np.int64)),
               torch.from_numpy(np.stack([flat_t[s:s + seq] for s in starts]).astype(np.int64)),
               [Counter(flat_d[s:s + seq]).most_common(1)[0][0] for s in starts])


def eval_windows(split, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping ``seq``-token windows tiling a split's documents joined end to end: every
    held-out token is scored once (the tail shorter than a window is dropped)."""
    flat, flat_t = np.concatenate(split[0]), np.concatenate(split[1])
    n = len(flat) // seq
    if n == 0:
        raise ValueError(f"eval_windows: the split has {len(flat)} tokens, fewer than one window of {seq}")
    window = lambda a: torch.from_numpy(a[:n * seq].reshape(n, seq).astype(np.int64))  # noqa: E731
    return window(flat), window(flat_t)


@torch.no_grad()
def heldout_metrics(model, windows: tuple[torch.Tensor, torch.Tensor], batch: int) -> dict:
    """Held-out next-token loss (mean over every predicted token of ``windows``) and, for a model with
    routers, the last router's next-topic accuracy (its prediction at t against token t+1's topic,
    what generation feeds back; over labelled tokens)."""
    ids, topics = windows
    was_training = model.training
    model.eval()
    loss_sum = tokens = correct = labelled = 0
    for i in range(0, len(ids), batch):
        x, t = ids[i:i + batch], topics[i:i + batch]
        out = model(x, topic_ids=t, labels=x)
        loss_sum += float(out.aux["ntp"]) * x[:, 1:].numel()
        tokens += x[:, 1:].numel()
        if out.next_topic_ids is not None:
            target = t[:, 1:]
            m = target >= 0
            correct += int((out.next_topic_ids[:, :-1] == target)[m].sum())
            labelled += int(m.sum())
    model.train(was_training)
    return {"ntp": loss_sum / tokens, **({"next_topic_acc": correct / labelled} if labelled else {})}


def optimise(model, batches, steps: int, lr: float, one_cycle: bool = True, after_backward=None, after_step=None,
             progress: bool = False, desc: str = "stage 2") -> list[float]:
    """AdamW (weight decay 0.01), gradient clipping at 1, a one-cycle or constant ``lr``; hooks
    ``after_backward(step, out)`` (gradients are there) and ``after_step(step, out)``. Returns the
    training NTP curve."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1) if one_cycle else None
    model.train()
    curve = []
    for step, (x, t, _) in enumerate(tqdm(batches, total=steps, desc=desc, disable=not progress), 1):
        out = model(x, topic_ids=t, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if after_backward is not None:
            after_backward(step, out)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        curve.append(float(out.aux["ntp"]))
        if after_step is not None:
            after_step(step, out)
    return curve


def train_model(train, heldout, config: dict, steps: int, seq: int, batch: int, seed: int = 0, lr: float = 3e-3,
                progress: bool = True, desc: str = "stage 2", eval_every: int | None = None):
    """One seeded Stage-2 run of a ``DoEForCausalLM(DoEConfig(**config))`` on windows of ``train``
    (:func:`optimise`, one-cycle lr); the batches are the same for every config and seed. Returns
    ``(result, model, tracker)``: ``result`` has the training NTP curve, held-out NTP loss and
    perplexity over every held-out token (:func:`heldout_metrics`; with ``eval_every``, also the held-out
    curve ``[[step, loss], ...]``), the next-topic accuracy (with routers), train seconds (evaluation
    excluded), tokens/s, parameters and peak RSS."""
    from doe_ext._memory import peak_rss_mib, reset_peak_rss
    from doe_ext.analysis import UtilizationTracker
    from doe_ext.models import DoEConfig, DoEForCausalLM

    measured = reset_peak_rss()
    torch.manual_seed(seed)
    model = DoEForCausalLM(DoEConfig(**config))
    windows = eval_windows(heldout, seq)
    tracker = UtilizationTracker()
    heldout_curve, eval_s = [], 0.0

    def after_step(step, out):
        nonlocal eval_s
        if out.aux["layers"]:
            tracker.update(out.aux)
        if eval_every and (step % eval_every == 0 or step == steps):
            t = time.perf_counter()
            heldout_curve.append([step, heldout_metrics(model, windows, batch)["ntp"]])
            eval_s += time.perf_counter() - t

    t0 = time.perf_counter()
    curve = optimise(model, batches(*train, seq, batch, steps, seed=1), steps, lr, after_step=after_step,
                     progress=progress, desc=desc)
    train_s = time.perf_counter() - t0 - eval_s
    final = heldout_metrics(model, windows, batch)
    model.eval()
    result = {"train_ntp_curve": curve, "heldout_ntp": final["ntp"], "heldout_ppl": math.exp(final["ntp"]),
              "train_s": round(train_s, 1), "tokens_per_s": steps * seq * batch / max(train_s, 1e-9),
              "params": sum(p.numel() for p in model.parameters()),
              "peak_rss_mib": peak_rss_mib() if measured else None}  # of the process during this run
    if "next_topic_acc" in final:
        result["next_topic_acc"] = final["next_topic_acc"]
    if eval_every:
        result["heldout_curve"] = heldout_curve
    return result, model, tracker


# Stage 2's models: DoE; the dense Base (no topics); the fair control, a dense model fed DoE's topic embedding.
STAGE2_MODELS = {"doe": {}, "dense": {"knowledge": False}, "dense + topics": {"knowledge": False, "topic_input": True}}


def model_config(vocab_size: int, num_topics: int, seq: int, width: int, **extra) -> dict:
    """The demo's Stage-2 model: 3 layers of ``width``, 4 heads, topic and latent width 32."""
    return dict(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=3, num_attention_heads=4,
                intermediate_size=int(2.75 * width), num_topics=num_topics, topic_dim=32, latent_dim=32,
                max_position_embeddings=seq, pad_token_id=0, bos_token_id=2, eos_token_id=2, **extra)


def stage2(train, heldout, vocab_size: int, num_topics: int, steps: int, seq: int, batch: int, width: int,
           progress: bool = True):
    """Train DoE, the dense Base and the fair control (the dense Base fed the same topic embedding as
    DoE) on the same batches; held-out NTP loss of each."""
    results, models, trackers = {}, {}, {}
    for name, extra in STAGE2_MODELS.items():
        res, models[name], trackers[name] = train_model(train, heldout, model_config(vocab_size, num_topics, seq, width,
                                                                                      **extra),
                                                        steps, seq, batch, desc=f"stage 2: {name}",
                                                        progress=progress)
        results[name] = {k: res[k] for k in ("train_ntp_curve", "heldout_ntp", "heldout_ppl", "train_s", "params")}
    return results, models, trackers
