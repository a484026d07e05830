"""DMoE (issue targets): expert training vs a PEFT loop, BM25 routing at the paper's bank size
(SQLite FTS5 vs bm25s vs tantivy), expert loading, generation overhead of triggers, mixed batches,
and bytes per expert. SmolLM2-135M-Instruct (the real base), passages from Debian's package records
(``apt-cache dumpavail``: name, section, maintainer, homepage, description)."""
from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from doe_ext.dmoe.data import debian_records, passage

PAPER_BANK = 27_613


def templated_qa(f: dict[str, str]) -> list[dict[str, str]]:
    """Three QA pairs read off the record's fields (for timing the PRAG instance layout; no model involved)."""
    qa = [("Which section is the Debian package {} in?", "Section"), ("Who maintains the Debian package {}?",
                                                                       "Maintainer"),
          ("What does the Debian package {} provide?", "Description")]
    return [{"question": q.format(f["Package"]), "answer": f.get(k, "unknown"), "full_answer": f.get(k, "unknown")}
            for q, k in qa]


def _median_ms(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def bench_training(base, items, epochs: int) -> dict:
    """Seconds per expert: our batched trainer vs PEFT (one expert at a time, PRAG's loop), same instances."""
    import peft

    from doe_ext.dmoe import Recipe, train_experts
    from doe_ext.dmoe.instances import training_instances

    cfg = Recipe(epochs=epochs)
    t0 = time.perf_counter()
    train_experts(base, items, cfg)
    ours = (time.perf_counter() - t0) / len(items)

    import copy

    from doe_ext.dmoe import ExpertSite

    model = copy.deepcopy(base.model)
    ExpertSite(model).detach()  # PEFT wraps the plain projections
    last_layer = model.config.num_hidden_layers - 1
    lcfg = peft.LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                           target_modules=["gate_proj", "up_proj", "down_proj"], layers_to_transform=[last_layer])
    pm = peft.get_peft_model(model, lcfg)
    init = {k: v.clone() for k, v in pm.state_dict().items() if "lora_" in k}
    t0 = time.perf_counter()
    for doc, aug in items:
        pm.load_state_dict(init, strict=False)  # a fresh expert, as PRAG reloads its base adapter
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=cfg.lr)
        insts = training_instances(base.tokenizer, doc.text, aug, cfg.max_length)
        for _ in range(epochs):
            for inst in insts:
                ids = torch.tensor([inst.ids])
                labels = ids.clone()
                labels[:, :inst.loss_start + 1] = -100  # HF shifts: label j is predicted at j - 1
                loss = pm(input_ids=ids, labels=labels).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
    peft_s = (time.perf_counter() - t0) / len(items)
    # FLOP floor per expert: one body forward per instance, then per epoch the last MLP block and the head
    # forward + backward (input grads only) on the loss rows.
    n_params = sum(p.numel() for p in base.model.parameters())
    head = base.model.get_output_embeddings().weight.numel()
    last_mlp = sum(p.numel() for p in base.site.mlp.parameters())
    insts = [i for d, a in items for i in training_instances(base.tokenizer, d.text, a, cfg.max_length)]
    tokens = sum(len(i.ids) for i in insts)
    loss_rows = sum(len(i.ids) - 1 - i.loss_start for i in insts)
    floor = 2 * (n_params - head) * tokens + epochs * 3 * 2 * (last_mlp + head) * loss_rows
    # PEFT's loop, at best: per epoch the whole forward, the head's input gradient on every position (HF
    # takes logits everywhere), the last MLP block's backward.
    peft_floor = epochs * (2 * n_params * tokens + 2 * head * tokens + 4 * last_mlp * tokens)
    return {"ours_s": ours, "peft_s": peft_s, "speedup": peft_s / ours, "flop_floor_gflop": floor / 1e9 / len(items),
            "peft_floor_gflop": peft_floor / 1e9 / len(items), "tokens_per_expert": tokens / len(items),
            "loss_rows_per_expert": loss_rows / len(items), "instances_per_expert": len(insts) / len(items)}


def bench_routing(texts: list[str], queries: list[str], workdir: Path) -> list[dict]:
    """Top-3 BM25 over the surrogates (k1 1.2, b 0.75 everywhere): query latency, index build, adding
    one document, for SQLite FTS5, bm25s and tantivy, then ExpertBank.route itself (tantivy + the row
    check), on the same texts and queries."""
    import sqlite3

    import bm25s
    import tantivy

    from doe_ext.dmoe import ExpertBank, Recipe
    from doe_ext.dmoe.bank import DB, query_terms

    n_q = 3 * len(queries)
    rows = []
    cycle = lambda xs: (xs[i % len(xs)] for i in range(10 ** 9))  # noqa: E731

    db = sqlite3.connect(workdir / "fts.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE VIRTUAL TABLE docs USING fts5(body)")
    t0 = time.perf_counter()
    db.execute("BEGIN")
    db.executemany("INSERT INTO docs(rowid, body) VALUES (?, ?)", list(enumerate(texts)))
    db.execute("COMMIT")
    build = time.perf_counter() - t0
    q = cycle([" OR ".join(f'"{t}"' for t in query_terms(x)) for x in queries])
    sql = "SELECT rowid FROM docs WHERE docs MATCH ? ORDER BY bm25(docs) LIMIT 3"
    fts_ms = _median_ms(lambda: db.execute(sql, (next(q),)).fetchall(), min(n_q, 60))
    k = iter(range(len(texts), 10 ** 9))
    add = _median_ms(lambda: db.execute("INSERT INTO docs(rowid, body) VALUES (?, ?)", (next(k), texts[0])), 20)
    rows.append({"engine": "sqlite-fts5", "query_ms": fts_ms, "build_s": build, "add_one_ms": add})
    db.close()

    tok = lambda xs: bm25s.tokenize(xs, stopwords=None, show_progress=False)  # noqa: E731
    t0 = time.perf_counter()
    retriever = bm25s.BM25(k1=1.2, b=0.75)
    retriever.index(tok(texts), show_progress=False)
    build = time.perf_counter() - t0
    qt = cycle([tok([x]) for x in queries])
    bm_ms = _median_ms(lambda: retriever.retrieve(next(qt), k=3, show_progress=False), n_q)
    rows.append({"engine": "bm25s", "query_ms": bm_ms, "build_s": build, "add_one_ms": 1e3 * build,
                 "note": "no incremental add: adding re-indexes everything"})

    # The bank itself: rows inserted in one transaction (weights play no part in routing), indexed by the
    # bank's own reconcile (one tantivy commit), then ExpertBank.route, then one real add.
    bank = ExpertBank(workdir / "route-bank", create=True, fingerprint="bench", recipe=Recipe())
    bank.close()
    db = sqlite3.connect(workdir / "route-bank" / DB, isolation_level=None)
    db.execute("BEGIN")
    db.executemany("INSERT INTO experts (id, text, augmentation, surrogate, config, fingerprint, checksum, file, created)"
                   " VALUES (?, '', '{}', ?, '{}', 'bench', 'c', 'x', 0)", [(f"e{i}", t) for i, t in enumerate(texts)])
    db.execute("COMMIT")
    db.close()
    t0 = time.perf_counter()
    bank = ExpertBank(workdir / "route-bank")
    build = time.perf_counter() - t0
    qs = cycle(queries)
    bank_ms = _median_ms(lambda: bank.route(next(qs), 3), n_q)
    expert = {"w.lora_a": torch.zeros(4, 8), "w.lora_b": torch.zeros(8, 4)}
    k = iter(range(10 ** 9))
    add = _median_ms(lambda: bank.add(f"new{next(k)}", expert, texts[0], texts[0]), 10)
    rows.append({"engine": "tantivy (ExpertBank.route)", "query_ms": bank_ms, "build_s": build, "add_one_ms": add,
                 "note": "add_one: weights written + fsynced, row committed, index committed"})
    searcher = bank._index.searcher()
    tq = cycle([tantivy.Query.boolean_query([(tantivy.Occur.Should, tantivy.Query.term_query(bank._schema, "body", t))
                                             for t in query_terms(x)]) for x in queries])
    raw_ms = _median_ms(lambda: searcher.search(next(tq), 3).hits, n_q)
    rows.append({"engine": "tantivy (search only)", "query_ms": raw_ms, "build_s": build, "add_one_ms": None})
    bank.close()
    return rows


def bench_generation(base, bank, prompts: list[str], max_new: int, rounds: int = 3) -> dict:
    """ms per generated token, the variants interleaved round by round (medians over ``rounds``): HF's
    greedy ``generate``, DMoE with tau = inf (our decoding loop, no trigger), DMoE with tau = 2, one
    prompt at a time; then the 8 prompts as one mixed batch against the same 8 one at a time."""
    from doe_ext.dmoe import DMoE

    dmoe = DMoE(base, bank, tau=2.0)
    tok = base.tokenizer

    def hf_each():
        n = 0
        for p in prompts:
            enc = tok(p, return_tensors="pt", add_special_tokens=False)
            out = base.model.generate(**enc, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
            n += out.shape[1] - enc["input_ids"].shape[1]
        return n

    def ours_each(tau):
        return sum(len(dmoe.generate(p, max_new, tau=tau)[0].tokens) for p in prompts)

    def batch():
        return sum(len(g.tokens) for g in dmoe.generate(prompts, max_new, tau=2.0))

    fns = {"hf_greedy": hf_each, "dmoe_tau_inf": lambda: ours_each(math.inf), "dmoe_tau_2": lambda: ours_each(2.0),
           "batch8_tau_2": batch}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            n = fn()
            times[name].append(1e3 * (time.perf_counter() - t0) / n)
    res = {k + "_ms_per_token": statistics.median(v) for k, v in times.items()}
    res["triggers_per_sequence"] = statistics.mean(len(g.triggers) for g in dmoe.generate(prompts, max_new, tau=2.0))
    res.update(batch_speedup=res["dmoe_tau_2_ms_per_token"] / res["batch8_tau_2_ms_per_token"],
               trigger_overhead=res["dmoe_tau_2_ms_per_token"] / res["hf_greedy_ms_per_token"],
               trigger_overhead_own_loop=res["dmoe_tau_2_ms_per_token"] / res["dmoe_tau_inf_ms_per_token"])
    return res


def read_bandwidth(mib: int = 1024, reps: int = 5, x: torch.Tensor | None = None, how: str = "sum") -> float:
    """Bytes per second this machine reads: the median time of reading a ``mib`` MiB float32 tensor once
    (far larger than the caches), or ``x`` (already faulted in) when given. ``how``: ``"sum"``, ATen's
    ``sum`` (one sequential stream per thread), or ``"gemv"``, the tensor as the weight ``[n, 512]`` of
    one ``decode_linear`` row (four streams per thread). Neither is the machine's peak: the faster of
    the two gives the tighter floor (on the AMD EPYC host of 2026-12-07 that was the sum)."""
    if x is None:
        x = torch.ones(mib * 2**18)
        x.sum()  # fault the pages in
    if how == "gemv":
        from doe_ext.ops import decode_linear

        w, row = x.view(-1, 512), torch.ones(1, 512)
        read = lambda: decode_linear(row, w)  # noqa: E731
    elif how == "sum":
        read = x.sum
    else:
        raise ValueError(f"read_bandwidth: `how` must be 'sum' or 'gemv', got {how!r}")
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        read()
        t.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(t)


def weight_bytes(model) -> int:
    """Bytes of the model's weights one decoding step reads: every parameter once (a tied head reads the
    embedding table it shares, counted once)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def bench_decode_floor(base, bank, prompt: str, steps: int = 32, batches=(1, 8), rounds: int = 5) -> list[dict]:
    """Decode ms per step, at each batch size, beside the memory-bandwidth floor (the weights' bytes
    over the read bandwidth measured in the same run): HF's greedy ``generate``, our decoding loop
    without triggers (DMoE, tau = inf; through :class:`~doe_ext.nn.LeanDecoder` with its fused C++ layer
    ops, ``ours_unfused`` through it with ATen's ops, and ``ours_forward`` through the model's ``forward``)
    and DMoE with triggers (tau = 2; per row and step of that run: ``triggers_per_step``, and
    ``repredictions_per_step``, the triggers that routed to another set than the active one and so
    predicted again). A step's time is the run with ``steps + 1`` new tokens minus the run with 1 (the
    prefill and the first token), over ``steps``;
    the batch repeats ``prompt`` (no padding); medians over ``rounds``, the variants interleaved. The
    read bandwidth is measured in each round beside them (this VM's moves by a third within minutes),
    and the floor is the weights' bytes over its median; ``x_floor_paired`` is the median over rounds of
    each round's step over that round's floor. The bandwidth is read two ways (:func:`read_bandwidth`):
    ``floor_ms`` from ATen's ``sum`` (the floor of every earlier run), ``floor_ms_gemv`` from a 1 GiB
    ``decode_linear`` read, with ``x_floor_gemv`` and its paired ratios beside: the lower floor is the
    stricter one."""
    from doe_ext.dmoe import DMoE
    from doe_ext.nn import LeanDecoder

    dmoe = DMoE(base, bank, tau=2.0)
    via_forward = DMoE(base, bank, tau=2.0, lean=False)  # the steps through the model's forward
    unfused = DMoE(base, bank, tau=2.0)
    unfused._lean = LeanDecoder(base.model, fused=False)  # the lean loop of ATen ops
    dmoe.eos_tokens = via_forward.eos_tokens = unfused.eos_tokens = set  # each run decodes the steps asked for
    enc = base.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    big = torch.ones(2**28)  # 1 GiB, read for the bandwidth in each round
    big.sum()

    def hf(b, n):
        ids = enc["input_ids"].expand(b, -1)
        base.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False)

    def ours(tau, model=dmoe):
        return lambda b, n: model.generate([prompt] * b, n, tau=tau)

    variants = {"hf_generate": hf, "ours_forward_no_trigger": ours(math.inf, via_forward),
                "ours_unfused_no_trigger": ours(math.inf, unfused), "ours_no_trigger": ours(math.inf),
                "dmoe_tau_2": ours(2.0)}
    rows = []
    for b in batches:
        times, bws, bws_gemv = {k: [] for k in variants}, [], []
        for fn in variants.values():
            fn(b, 2)  # warm
        for _ in range(rounds):
            bws.append(read_bandwidth(x=big))
            bws_gemv.append(read_bandwidth(x=big, how="gemv"))
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn(b, 1)
                t1 = time.perf_counter()
                fn(b, steps + 1)
                times[name].append(1e3 * ((time.perf_counter() - t1) - (t1 - t0)) / steps)
        ms = {k: statistics.median(v) for k, v in times.items()}
        wb = weight_bytes(base.model)
        before = dmoe.repredicted_rows
        gens = dmoe.generate([prompt] * b, steps + 1, tau=2.0)
        row = {"batch": b, "ms_per_step": ms}
        for tag, reads in (("", bws), ("_gemv", bws_gemv)):
            floor = row[f"floor_ms{tag}"] = 1e3 * wb / statistics.median(reads)
            row[f"x_floor{tag}"] = {k: v / floor for k, v in ms.items()}
            # each round's step over that round's floor (1e3 * wb / bw ms)
            row[f"x_floor{tag}_paired"] = {k: statistics.median(t * bw / (1e3 * wb) for t, bw in zip(v, reads))
                                           for k, v in times.items()}
        rows.append({**row,
                     "triggers_per_step": sum(len(g.triggers) for g in gens) / (b * steps),
                     "repredictions_per_step": (dmoe.repredicted_rows - before) / (b * steps)})
    return rows


def bench_gemv(base, min_bytes: float = 400e6, rounds: int = 5) -> list[dict]:
    """What bounds a decoding step: the time of one token's pass through every linear layer of the base
    (float32, x [1, in] @ W.T), per distinct weight shape, through ``torch.mm`` (what ``F.linear`` runs
    on the CPU: MKL's sgemm) and through oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``),
    beside the bytes over the read bandwidth measured in the same run. Each shape is timed on enough
    distinct random weights (>= ``min_bytes``) that they come from memory, as a step's do."""
    linears = [m for m in base.model.modules() if isinstance(m, torch.nn.Linear)]
    shapes: dict[tuple[int, int], int] = {}
    for m in linears:
        shapes[tuple(m.weight.shape)] = shapes.get(tuple(m.weight.shape), 0) + 1
    bw = read_bandwidth()
    rows = []
    for (out_f, in_f), count in sorted(shapes.items()):
        k = max(2, int(min_bytes // (out_f * in_f * 4)))
        ws = [torch.randn(out_f, in_f) for _ in range(k)]
        x = torch.randn(1, in_f)
        paths = {"mm": lambda: [torch.mm(x, w.t()) for w in ws]}
        if torch.backends.mkldnn.is_available():
            paths["onednn"] = lambda: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") for w in ws]
        us = {}
        for name, f in paths.items():
            f()
            t = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                f()
                t.append(time.perf_counter() - t0)
            us[name] = 1e6 * statistics.median(t) / k
        floor_us = 1e6 * out_f * in_f * 4 / bw
        rows.append({"shape": [out_f, in_f], "layers": count, "us": {n: round(v, 1) for n, v in us.items()},
                     "floor_us": round(floor_us, 1), "GB_s": {n: round(out_f * in_f * 4 / v / 1e3, 1) for n, v in us.items()},
                     "read_GB_s": round(bw / 1e9, 1)})
    total = {n: round(sum(r["us"][n] * r["layers"] for r in rows) / 1e3, 2) for n in rows[0]["us"]}
    rows.append({"one_token_through_every_linear_ms": total,
                 "floor_ms": round(sum(r["floor_us"] * r["layers"] for r in rows) / 1e3, 2)})
    return rows


def random_bank(base, passages: list[tuple[str, str]], path: Path):
    """A bank of one random rank-4 expert per ``(id, text)`` on the base's last MLP (seeded; B small, so
    the outputs stay near the base's): what the loading, generation and decoding benchmarks run on."""
    from doe_ext.dmoe import ExpertBank, Recipe

    bank = ExpertBank(path, create=True, fingerprint=base.fingerprint, base_name=base.name, recipe=Recipe())
    gen = torch.Generator().manual_seed(0)
    for pkg, text in passages:
        e = {}
        for n, (o, i) in base.site.shapes().items():
            e[f"{n}.lora_a"] = torch.randn(4, i, generator=gen) / i ** 0.5
            e[f"{n}.lora_b"] = torch.randn(o, 4, generator=gen) * 1e-3
        bank.add(pkg, e, text, text)
    return bank


def decode_floor_rows(base, bank, prompt: str, device: str = "cpu") -> list[dict]:
    """:func:`bench_decode_floor` as benchmark rows."""
    n = len(base.tokenizer(prompt)["input_ids"])
    rows = []
    for r in bench_decode_floor(base, bank, prompt):
        row = {"bench": "dmoe_decode_step", "shape": f"batch {r['batch']}, 32 steps after a {n}-token prompt, "
               f"{len(bank.ids())}-expert bank", "dtype": "float32", "device": device,
               "ms": {k: round(v, 2) for k, v in r["ms_per_step"].items()}}
        for tag in ("", "_gemv"):
            row[f"floor_ms{tag}"] = round(r[f"floor_ms{tag}"], 2)
            for key in (f"x_floor{tag}", f"x_floor{tag}_paired"):
                row[key] = {k: round(v, 2) for k, v in r[key].items()}
        rows.append({**row, "triggers_per_step": round(r["triggers_per_step"], 3),
                     "repredictions_per_step": round(r["repredictions_per_step"], 3)})
    return rows


def bench_recipes(base, docs, workdir: Path, recipes: dict | None = None) -> dict:
    """Seconds per expert of a whole bank build (augmentation, distillation teacher, training), one
    recipe after the other in one process on the same documents (nothing one build made reused by the
    next): by default the demo's recipe before issue 21 (next-token loss on the passage, lr 3e-3, 10
    epochs), the paper's and the package default."""
    from doe_ext.dmoe import RECIPES, ExpertBank, Recipe, build_bank
    from doe_ext.dmoe.build import forget_made

    recipes = recipes or {"passage, next-token (before)": Recipe(objective="next_token", augment="none", lr=3e-3,
                                                                 epochs=10),
                          "paper": RECIPES["paper"], "default": RECIPES["default"]}
    out = {}
    for name, recipe in recipes.items():
        forget_made()  # this process's augmentations, made for an earlier bank
        bank = ExpertBank(workdir / f"recipe-{len(out)}", create=True, fingerprint=base.fingerprint, recipe=recipe)
        t0 = time.perf_counter()
        build_bank(base, docs, bank, progress=False)
        out[name] = (time.perf_counter() - t0) / len(docs)
        bank.close()
    return out


def run(device: str) -> list[dict]:
    if device != "cpu":
        return []  # the DMoE loop is measured on the CPU; CUDA runs of it are not set up yet
    from doe_ext.dmoe import Augmentation, Document, load_base, qa_prompt

    base = load_base("smollm2-135m")
    records = debian_records(PAPER_BANK + 200)
    passages = [(f["Package"], passage(f)) for f in records]
    rows = []
    layouts = {"passage only": [(Document(f["Package"], passage(f)), Augmentation()) for f in records[:16]],
               "PRAG layout, 3 templated QA": [(Document(f["Package"], passage(f)),
                                                Augmentation("model", "", templated_qa(f), 1)) for f in records[:16]]}
    for layout, items in layouts.items():
        for epochs in (1, 5):
            r = bench_training(base, items, epochs)
            rows.append({"bench": "dmoe_train", "shape": f"SmolLM2-135M, 16 docs, {layout}: "
                         f"{r['instances_per_expert']:.0f} inst, {r['tokens_per_expert']:.0f} tok, "
                         f"{r['loss_rows_per_expert']:.0f} loss rows per expert, epochs {epochs}, rank 4",
                         "dtype": "float32", "device": device,
                         "ms": {"ours_per_expert": round(1e3 * r["ours_s"], 1),
                                "peft_per_expert": round(1e3 * r["peft_s"], 1)},
                         "speedup": {"vs_peft": round(r["speedup"], 2),
                                     "flop_floor_ratio": round(r["peft_floor_gflop"] / r["flop_floor_gflop"], 2)},
                         "flop_floor_gflop_per_expert": round(r["flop_floor_gflop"], 2),
                         "peft_flop_floor_gflop_per_expert": round(r["peft_floor_gflop"], 2)})
    work = Path(tempfile.mkdtemp(prefix="bench-dmoe-"))
    try:
        per = bench_recipes(base, [Document(pkg, text) for pkg, text in passages[:32]], work)
        before = per["passage, next-token (before)"]
        rows.append({"bench": "dmoe_recipes", "shape": "SmolLM2-135M, a bank of 32 Debian records, whole build",
                     "dtype": "float32", "device": device, "ms": {k: round(1e3 * v) for k, v in per.items()},
                     "speedup": {f"{k} / before": round(v / before, 2) for k, v in per.items()}})
        surrogates = [t for _, t in passages[:PAPER_BANK]]
        assert len(surrogates) == PAPER_BANK, f"only {len(surrogates)} package records on this machine"
        tok = base.tokenizer
        held = [t for _, t in passages[PAPER_BANK:PAPER_BANK + 200]]
        # Routing queries at their longest: 128 tokens of held-out records (DMoE cuts queries to 128).
        queries = [tok.decode(tok(" ".join(held[i:i + 8]), add_special_tokens=False)["input_ids"][-128:])
                   for i in range(0, 192, 2)]
        for r in bench_routing(surrogates, queries, work):
            rows.append({"bench": "dmoe_route", "shape": f"{len(surrogates)} surrogates, top-3, 128-token queries",
                         "dtype": "-", "device": device, "engine": r["engine"],
                         "ms": {"query_median": round(r["query_ms"], 3),
                                **({"add_one": round(r["add_one_ms"], 3)} if r["add_one_ms"] is not None else {})},
                         "build_s": round(r["build_s"], 2), **({"note": r["note"]} if "note" in r else {})})
        bank = random_bank(base, passages[:64], work / "bank")
        raw = sum(v.numel() * 4 for v in bank.get(bank.ids()[-1]).values())  # float32, as stored
        size = statistics.mean((bank.path / "experts" / r.file).stat().st_size for r in bank.rows())
        ids = bank.ids()
        names = base.site.names
        it = iter(range(10 ** 9))

        def cold():
            bank._cache.clear()
            k = next(it)
            bank.load([ids[(3 * k + j) % len(ids)] for j in range(3)], names)

        rows.append({"bench": "dmoe_load3", "shape": "3 experts, SmolLM2 last MLP, rank 4", "dtype": "float32",
                     "device": device, "ms": {"file_read_verify": round(_median_ms(cold, 50), 3),
                                              "lru_hit": round(_median_ms(lambda: bank.load(ids[:3], names), 50), 3)},
                     "bytes_per_expert": size, "raw_param_bytes": raw, "overhead_pct": round(100 * (size / raw - 1), 2)})
        prompts = [qa_prompt(tok, f"What is the Debian package {pkg}?") for pkg, _ in passages[:8]]
        g = bench_generation(base, bank, prompts, 32)
        rows.append({"bench": "dmoe_generate", "shape": "8 prompts, 32 new tokens, 64-expert bank, tau 2, top-3",
                     "dtype": "float32", "device": device,
                     "ms": {k[:-len("_ms_per_token")]: round(v, 2) for k, v in g.items() if k.endswith("_ms_per_token")},
                     "speedup": {"batch8_vs_sequential": round(g["batch_speedup"], 2),
                                 "trigger_cost_vs_hf": round(g["trigger_overhead"], 3),
                                 "trigger_cost_vs_own_loop": round(g["trigger_overhead_own_loop"], 3)},
                     "triggers_per_sequence": g["triggers_per_sequence"]})
        rows += decode_floor_rows(base, bank, prompts[0], device)
        rows += bench_prefill_peak(base)  # (bench_best_batch builds a bank of its own: --best-batch)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def decode_floor(device: str = "cpu") -> list[dict]:
    """The decode-step rows alone (``--decode-floor``): SmolLM2-135M, a 64-expert random bank, the first
    of :func:`run`'s generation prompts."""
    from doe_ext.dmoe import load_base, qa_prompt

    base = load_base("smollm2-135m")
    passages = [(f["Package"], passage(f)) for f in debian_records(64)]
    work = Path(tempfile.mkdtemp(prefix="bench-dmoe-"))
    try:
        bank = random_bank(base, passages, work / "bank")
        return decode_floor_rows(base, bank, qa_prompt(base.tokenizer, f"What is the Debian package {passages[0][0]}?"),
                                 device)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def gemm_peak(sizes=(1024, 2048, 3072), reps: int = 5) -> dict:
    """The float32 FLOP/s this machine's GEMM reaches (torch.mm of square matrices, all threads, best
    median over ``sizes``): the measured peak the prefill is put beside."""
    best = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            t.append(time.perf_counter() - t0)
        best[n] = 2 * n ** 3 / statistics.median(t)
    return {"flops": max(best.values()), "by_size": best}


def prefill_flops(model, tokens: int) -> float:
    """Forward FLOPs of a prefill of ``tokens`` tokens that keeps the last position's logits (as
    ``generate`` does): 2 per weight of every decoder projection and token, the head once, and causal
    attention's QK^T and AV (2 · 2 · d_attn · T²/2 per layer)."""
    cfg = model.config
    layers = model.model.layers
    proj = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    head = model.get_output_embeddings().weight.numel()
    return 2 * proj * tokens + 2 * head + len(layers) * 2 * d_attn * tokens ** 2


def bench_prefill_peak(base, lengths=(128, 512), reps: int = 5) -> list[dict]:
    """Prefill tokens/s and FLOP/s of the base (one sequence, float32, ``logits_to_keep=1``) beside the
    GEMM peak measured in the same run."""
    peak = gemm_peak()
    rows = []
    for T in lengths:
        ids = torch.randint(10, base.tokenizer.vocab_size - 10, (1, T))
        with torch.inference_mode():
            base.model(ids, logits_to_keep=1)
            t = []
            for _ in range(reps):
                t0 = time.perf_counter()
                base.model(ids, logits_to_keep=1)
                t.append(time.perf_counter() - t0)
        sec = statistics.median(t)
        flops = prefill_flops(base.model, T) / sec
        rows.append({"bench": "dmoe_prefill", "shape": f"SmolLM2-135M, 1 x {T} tokens, logits of the last",
                     "dtype": "float32", "device": "cpu", "ms": round(1e3 * sec, 1), "tokens_per_s": round(T / sec),
                     "gflops": round(flops / 1e9, 1), "gemm_peak_gflops": round(peak["flops"] / 1e9, 1),
                     "share_of_peak": round(flops / peak["flops"], 3),
                     "gemm_by_size_gflops": {n: round(v / 1e9, 1) for n, v in peak["by_size"].items()}})
    return rows


def bench_best_batch(questions: int = 16, batches=(1, 4, 16)) -> list[dict]:
    """DMoE's and FLARE-direct's latency per sample at each batch size, on a seeded sample of the packages
    test questions with a bank of their documents (the default recipe, built once under a temporary
    directory), and the ratio at each method's best batch size (the paper claims DMoE <= 1/3 of FLARE)."""
    from doe_ext.dmoe import ExpertBank, build_bank, load_base
    from doe_ext.dmoe.augment import Document
    from doe_ext.dmoe.data import load
    from doe_ext.dmoe.evaluate import Harness, evaluate, summarize
    from doe_ext.dmoe.recipe import DEFAULT
    from doe_ext.dmoe.data import sample, shots

    base = load_base("smollm2-135m")
    docs, qa = load("debian-packages-v1")
    test = sample([q for q in qa if q["split"] == "test"], questions)
    text = {d["id"]: d["text"] for d in docs}
    keep = {q["doc_id"] for q in test}
    work = Path(tempfile.mkdtemp(prefix="bench-dmoe-"))
    try:
        bank = ExpertBank(work / "bank", create=True, fingerprint=base.fingerprint, base_name=base.name,
                          recipe=DEFAULT)
        build_bank(base, [Document(d["id"], d["text"], d.get("title")) for d in docs if d["id"] in keep], bank,
                   progress=False)
        demos = shots([q for q in qa if q["split"] == "dev"], text)
        latency = {}
        for b in batches:
            h = Harness(base, bank, shots=demos, batch_size=b)
            summary = summarize(evaluate(h, test, ["flare", "dmoe"], progress=False))
            latency[b] = {m: summary[m]["latency_s"] for m in ("flare", "dmoe")}
        best = {m: min(latency[b][m] for b in batches) for m in ("flare", "dmoe")}
        return [{"bench": "dmoe_vs_flare", "shape": f"SmolLM2-135M, {len(test)} packages test questions, a bank of "
                 f"their {len(keep)} documents, default recipe", "dtype": "float32", "device": "cpu",
                 "latency_s_per_sample": {str(b): {m: round(v, 3) for m, v in row.items()} for b, row in latency.items()},
                 "best_s": {m: round(v, 3) for m, v in best.items()},
                 "dmoe_over_flare_at_best": round(best["dmoe"] / best["flare"], 3)}]
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="DMoE benchmarks (CPU)")
    ap.add_argument("--decode-floor", action="store_true", help="only the decode steps against the bandwidth floor")
    ap.add_argument("--prefill-peak", action="store_true", help="only the prefill against the measured GEMM peak")
    ap.add_argument("--best-batch", action="store_true",
                    help="only DMoE's and FLARE's latency per sample at batch sizes 1, 4 and 16")
    ap.add_argument("--gemv", action="store_true",
                    help="only one token through every linear layer of the base: MKL's and oneDNN's GEMV against the floor")
    args = ap.parse_args()
    if args.decode_floor or args.prefill_peak or args.best_batch or args.gemv:
        from doe_ext.dmoe import load_base

        rows = (decode_floor() if args.decode_floor else []) + (
            bench_prefill_peak(load_base("smollm2-135m")) if args.prefill_peak else []) + (
            bench_best_batch() if args.best_batch else []) + (bench_gemv(load_base("smollm2-135m")) if args.gemv else [])
    else:
        rows = run("cpu")
    print(json.dumps(rows, indent=1))
