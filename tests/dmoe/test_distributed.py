"""Expert training sharded over a local Ray instance with two workers equals one process."""
import pytest
import torch

from dmoe_testing import DOCS
from doe_ext.dmoe import Document, ExpertBank, LoRAConfig, Recipe, build_bank, load_base

ray = pytest.importorskip("ray")


def test_ray_two_workers_equal_one_process(llama_dir, tmp_path):
    from doe_ext.dmoe.distributed import build_bank_ray

    base = load_base(llama_dir)
    docs = [Document(d["id"], d["text"]) for d in DOCS]
    cfg = Recipe(lora=LoRAConfig(4, 16.0), lr=1e-2, epochs=2)

    def new(name):
        return ExpertBank(tmp_path / name, create=True, fingerprint=base.fingerprint, base_name=str(llama_dir),
                          recipe=cfg)

    local = new("local")
    build_bank(base, docs, local, group_size=2, progress=False)
    shared = new("ray")
    try:
        done = build_bank_ray(str(llama_dir), base.fingerprint, docs, shared, num_workers=2, group_size=2,
                              progress=False)
    finally:
        ray.shutdown()
    assert sorted(done) == sorted(d.id for d in docs)
    assert sorted(shared.ids()) == sorted(local.ids())
    for i in local.ids():
        assert shared.row(i).surrogate == local.row(i).surrogate
        a, b = local.get(i), shared.get(i)
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)
    assert build_bank_ray(str(llama_dir), base.fingerprint, docs, shared) == []  # all done
