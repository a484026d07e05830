"""Labelling shard folders on Ray (DoE App. F.1: Stage 1 runs once on a large CPU cluster).

``label_shards`` runs one Ray task per shard. The model (phi is recomputed from its counts, a
few MB at K = 128) goes into the object store once with ``ray.put``; tasks on a node read it from
the node's shared-memory store, so it is shipped once per node, not once per task. Each task calls
:meth:`LDA.label_to` on its shard, so the files are byte-identical to labelling on one machine
(labels depend on nothing but the document and the model), and a re-run after a failure resumes
each unfinished shard from its progress file.

On a cluster: start Ray on the nodes (``ray start --head`` / ``ray start --address=HEAD:6379``),
put the shards on storage every node can read (NFS, a mounted bucket), and call
``label_shards(..., address="auto")`` from any node — the same code as on one machine.

Fitting at that scale: fit on a sample of shards (``TokenCorpus`` of a few billion tokens is enough
to estimate K = 128 topics), then label everything here. A distributed E-step would run the same
AD-LDA sweep the engine runs across threads — each worker samples its shards against the last
merged counts and returns its count delta, which the driver sums — and is not offered yet.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from doe_ext.lda.corpus import TokenCorpus
from doe_ext.lda.model import LDA, UNLABELED


def _require_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError("doe_ext.lda.distributed needs Ray: pip install 'doe_ext[lda]'") from e
    return ray


def _label_one(state: dict, shard: str, out: str | None, unlabeled: str, chunk_tokens: int,
               threads: int) -> str:
    model = LDA.from_state(state)
    model.threads = threads
    corpus = TokenCorpus.open(shard)
    return str(model.label_to(corpus, out, unlabeled=unlabeled, chunk_tokens=chunk_tokens,
                              progress=False))


def label_shards(shards: Sequence[str | os.PathLike], model: LDA,
                 out: str | os.PathLike | None = None, *, unlabeled: str = "dominant",
                 chunk_tokens: int = 1 << 22, threads_per_task: int = 1,
                 address: str | None = None, progress: bool = True) -> list[Path]:
    """Label every shard folder in ``shards`` with ``model`` on Ray; returns the output folders.

    ``out=None`` writes each shard's labels into the shard folder; otherwise into
    ``out/<shard folder name>`` (shard names must then be distinct). Each task asks Ray for
    ``threads_per_task`` CPUs and uses that many engine threads. Connects to ``address``
    (e.g. ``"auto"``) or starts a local Ray when none is running.
    """
    ray = _require_ray()
    if unlabeled not in UNLABELED:
        raise ValueError(f"unlabeled must be one of {UNLABELED}, got {unlabeled!r}")
    shards = [Path(s) for s in shards]
    for s in shards:
        TokenCorpus.open(s)  # fail fast, naming the bad shard, before any task starts
    targets: list[str | None]
    if out is None:
        targets = [None] * len(shards)
    else:
        names = [s.name for s in shards]
        if len(set(names)) != len(names):
            raise ValueError("label_shards: shard folder names must be distinct when out is given")
        targets = [str(Path(out) / n) for n in names]
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    state_ref = ray.put(model.state())
    task = ray.remote(num_cpus=threads_per_task, max_retries=2)(_label_one)
    pending = [task.remote(state_ref, str(s), t, unlabeled, chunk_tokens, threads_per_task)
               for s, t in zip(shards, targets)]
    from tqdm.auto import tqdm
    results: dict = {}
    order = {ref: i for i, ref in enumerate(pending)}
    with tqdm(total=len(pending), desc="lda label (ray)", unit="shard", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[order[ref]] = Path(ray.get(ref))
                bar.update(1)
    return [results[i] for i in range(len(results))]
