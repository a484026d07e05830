"""Stage 1's quality, measured (issue 11): which LDA set-up gives readable topics that line up with
GCIDE's domains. Arms: LDA on BPE tokens or on whole words (projected back onto the tokens), with
LDA's usual document prior alpha = 50 / K or a sparse one (0.1); seeds are LDA seeds. Metrics:
mean NPMI coherence of each topic's top-10 units on the fitted corpus, and the NMI between each
definition's dominant topic and its domain (a label Stage 1 never sees). `stage1_topics.md` lists
the top words of every arm (seed 0)."""
import tempfile
from pathlib import Path

import pytest

from doe_ext.stage1 import load_gcide_domains, stage1
from doe_ext.testing.runs import SCALES

ARMS = {  # unit, max_doc_freq, alpha (None: 50 / K)
    "token_dense_alpha": ("token", 0.5, None),  # Stage 1 before this measurement
    "token_sparse_alpha": ("token", 0.5, 0.1),
    "word_dense_alpha": ("word", 0.1, None),
    "word_sparse_alpha": ("word", 0.1, 0.1),  # the default now
}
_DOCS, _TOPICS = {}, {}


@pytest.mark.parametrize("arm", ARMS)
def test_stage1_quality(ablation, ablation_seeds, ablation_scale, ablation_dir, arm):
    s = SCALES[ablation_scale]
    docs = _DOCS.setdefault(ablation_scale, load_gcide_domains(per_domain=s["per_domain"]))
    domains = [d for _, d in docs]
    unit, max_doc_freq, alpha = ARMS[arm]
    table = ablation("stage1", control="token_dense_alpha", title="Stage 1: LDA on tokens vs words, dense vs sparse prior")
    table.notes = __doc__.split("\n\n")[0].replace("\n", " ")
    for seed in ablation_seeds:
        with tempfile.TemporaryDirectory() as tmp:
            s1 = stage1(docs, Path(tmp), s["vocab"], s["topics"], s["lda_iters"], unit=unit,
                        max_doc_freq=max_doc_freq, alpha=alpha, seed=seed, progress=False)
        table.record(arm, seed, **s1.quality(domains), train_s=s1.fit_s)
        if seed == 0:
            _TOPICS[arm] = [f"## {arm} (unit {unit}, max_doc_freq {max_doc_freq}, alpha {alpha or '50/K'}, seed 0)",
                            ""] + [f"{k}. {' '.join(w)}" for k, w in enumerate(s1.top_words(8))] + [""]
    for metric in ("nmi", "npmi"):
        table.expect("word_sparse_alpha > token_dense_alpha", metric=metric, paper="– (the issue: topics are fragments)")
    table.expect("word_sparse_alpha > word_dense_alpha", metric="nmi", paper="–")
    table.expect("word_sparse_alpha > token_sparse_alpha", metric="nmi", paper="–")
    Path(ablation_dir).mkdir(parents=True, exist_ok=True)
    (Path(ablation_dir) / "stage1_topics.md").write_text("\n".join(
        ["# Stage 1: the top words of every topic, per arm", ""] + [ln for lines in _TOPICS.values() for ln in lines]))
