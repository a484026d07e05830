import numpy as np
import pytest

from lda_testing import draw_corpus
from doe_ext.lda import LDA

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'doe_ext[lda]')")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


def test_label_shards_on_ray_is_byte_identical_to_local(local_ray, tmp_path):
    from doe_ext.lda.distributed import label_shards

    shards = []
    for i in range(3):
        p = draw_corpus(docs=200 + 50 * i, length=50, seed=10 + i)
        shards.append(p.corpus.write(tmp_path / "shards" / f"shard-{i:05d}"))
    model = LDA(8, alpha=0.1, seed=0, threads=2).fit(shards[0], 20, progress=False, max_doc_freq=None)

    outs = label_shards([s.path for s in shards], model, tmp_path / "ray", chunk_tokens=3000,
                        progress=False)
    assert [o.name for o in outs] == [s.path.name for s in shards]
    for shard, out in zip(shards, outs):
        local = model.label_to(shard, tmp_path / "local" / shard.path.name, chunk_tokens=7000,
                               progress=False)
        for name in ("topic_ids.i16", "theta.f16", "labels.json"):
            assert (out / name).read_bytes() == (local / name).read_bytes(), (shard.path, name)
        topics, _ = shard.labels(out)
        assert np.array_equal(topics, model.label(shard)[0])
