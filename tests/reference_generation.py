"""Slow, obviously correct generation references shared by the native model's and the wrapper's tests."""
from __future__ import annotations

import torch


def reference_beam_search(model, ids, topics, num_beams: int, steps: int) -> list[int]:
    """Beam search with no cache: every step recomputes every beam from scratch, each beam carrying
    its own topic history (a generated token takes the topic predicted at the previous position)."""
    beams = [(0.0, ids.tolist(), topics.tolist())]
    for _ in range(steps):
        cands = []
        for score, toks, tps in beams:
            out = model(torch.tensor([toks]), topic_ids=torch.tensor([tps]))
            logp = out.logits[0, -1].float().log_softmax(-1)
            nxt = int(out.next_topic_ids[0, -1])
            top = logp.topk(2 * num_beams)
            cands += [(score + float(lp), toks + [int(t)], tps + [nxt]) for lp, t in zip(top.values, top.indices)]
        beams = sorted(cands, key=lambda c: -c[0])[:num_beams]
    return beams[0][1]
