import tempfile
from pathlib import Path
import numpy as np
from doe_ext.stage1 import load_gcide_domains, stage1
docs = load_gcide_domains(per_domain=800)
dom = [d for _, d in docs]
for name, kw, it in [("before (token, alpha 50/K, 150 sweeps)", dict(unit="token", max_doc_freq=0.5, alpha=None), 150),
                     ("now (word, df<=0.1, alpha 0.1, 300 sweeps)", dict(), 300)]:
    qs = []
    for seed in range(3):
        with tempfile.TemporaryDirectory() as t:
            s1 = stage1(docs, Path(t), 2000, 16, it, seed=seed, progress=False, **kw)
            qs.append(s1.quality(dom))
            if seed == 0: top = s1.top_words(8)
    print(name, {k: (round(float(np.mean([q[k] for q in qs])), 3), round(float(np.std([q[k] for q in qs], ddof=1)), 3)) for k in qs[0]})
    for k, w in enumerate(top[:6]): print("  ", k, " ".join(w))
