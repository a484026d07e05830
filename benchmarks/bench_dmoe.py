"""DMoE (issue targets): expert training vs a PEFT loop, BM25 routing at the paper's bank size
(SQLite FTS5 vs bm25s vs tantivy), expert loading, generation overhead of triggers, mixed batches,
and bytes per expert. SmolLM2-135M-Instruct (the real base), passages from Debian's package records
(``apt-cache dumpavail``: name, section, maintainer, homepage, description)."""
from __future__ import annotations

import math
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

PAPER_BANK = 27_613


def debian_passages(n: int | None = None) -> list[tuple[str, str]]:
    """(package, passage) from the machine's package lists, one record each."""
    out = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    docs = []
    for rec in out.split("\n\n"):
        f = dict(re.findall(r"^([A-Za-z-]+): (.*)$", rec, re.M))
        if "Package" not in f or "Description" not in f:
            continue
        text = (f"{f['Package']} is a Debian package in the section {f.get('Section', 'unknown')}, maintained by "
                f"{f.get('Maintainer', 'unknown')}. {f['Description']}.")
        if f.get("Homepage"):
            text += f" Its homepage is {f['Homepage']}."
        docs.append((f["Package"], text))
        if n is not None and len(docs) >= n:
            break
    return docs


def _median_ms(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def bench_training(base, docs, epochs: int) -> dict:
    """Seconds per expert: our batched trainer vs PEFT (one expert at a time, PRAG's loop), same instances."""
    import peft

    from doe_ext.dmoe import Augmentation, TrainConfig, train_experts
    from doe_ext.dmoe.train import training_instances

    cfg = TrainConfig(epochs=epochs)
    items = [(i, t, Augmentation()) for i, t in docs]
    t0 = time.perf_counter()
    train_experts(base, items, cfg)
    ours = (time.perf_counter() - t0) / len(items)

    import copy
    model = copy.deepcopy(base.model)
    last_layer = model.config.num_hidden_layers - 1
    lcfg = peft.LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                           target_modules=["gate_proj", "up_proj", "down_proj"], layers_to_transform=[last_layer])
    pm = peft.get_peft_model(model, lcfg)
    init = {k: v.clone() for k, v in pm.state_dict().items() if "lora_" in k}
    t0 = time.perf_counter()
    for _, text, aug in items:
        pm.load_state_dict(init, strict=False)  # a fresh expert, as PRAG reloads its base adapter
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=cfg.lr)
        insts = training_instances(base.tokenizer, text, aug, cfg.max_length)
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
    last_mlp = sum(p.numel() for p in base.last.mlp.parameters())
    tokens = sum(len(i.ids) for _, t, a in items for i in training_instances(base.tokenizer, t, a, cfg.max_length))
    floor = (2 * (n_params - head) * tokens + epochs * 3 * 2 * (last_mlp + head) * tokens) / len(items)
    return {"ours_s": ours, "peft_s": peft_s, "speedup": peft_s / ours, "flop_floor_gflop": floor / 1e9,
            "tokens_per_expert": tokens / len(items)}


def bench_routing(texts: list[str], queries: list[str], workdir: Path) -> list[dict]:
    """Top-3 BM25 over PAPER_BANK surrogates: query latency, index build, adding one document."""
    import sqlite3

    from doe_ext.dmoe.bank import _SCHEMA, fts_query

    rows = []
    db_path = workdir / "fts.sqlite"
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(_SCHEMA)
    t0 = time.perf_counter()
    db.execute("BEGIN")
    db.executemany("INSERT INTO experts (id, text, augmentation, surrogate, config, fingerprint, checksum, file, created)"
                   " VALUES (?, ?, '{}', ?, '{}', 'f', 'c', 'x', 0)", [(f"e{i}", t, t) for i, t in enumerate(texts)])
    db.execute("INSERT INTO surrogates(surrogates) VALUES ('rebuild')")
    db.execute("COMMIT")
    build = time.perf_counter() - t0
    q = [fts_query(x) for x in queries]
    sql = ("SELECT e.id FROM surrogates JOIN experts e ON e.rowid = surrogates.rowid WHERE surrogates MATCH ? "
           "ORDER BY bm25(surrogates), e.rowid LIMIT 3")
    it = iter(range(10 ** 9))
    fts_ms = _median_ms(lambda: db.execute(sql, (q[next(it) % len(q)],)).fetchall(), 3 * len(q))

    def add_one():
        db.execute("BEGIN")
        cur = db.execute("INSERT INTO experts (id, text, augmentation, surrogate, config, fingerprint, checksum, file, "
                         "created) VALUES (?, 't', '{}', ?, '{}', 'f', 'c', 'x', 0)", (f"n{time.time_ns()}", texts[0]))
        db.execute("INSERT INTO surrogates(rowid, surrogate) VALUES (?, ?)", (cur.lastrowid, texts[0]))
        db.execute("COMMIT")

    fts_add = _median_ms(add_one, 20)
    rows.append({"engine": "sqlite-fts5", "query_ms": fts_ms, "build_s": build, "add_one_ms": fts_add})
    db.close()

    import bm25s

    tok = lambda xs: bm25s.tokenize(xs, stopwords=None, show_progress=False)  # noqa: E731
    t0 = time.perf_counter()
    retriever = bm25s.BM25(k1=1.2, b=0.75)
    retriever.index(tok(texts), show_progress=False)
    build = time.perf_counter() - t0
    qt = [tok([x]) for x in queries]
    it = iter(range(10 ** 9))
    bm_ms = _median_ms(lambda: retriever.retrieve(qt[next(it) % len(qt)], k=3, show_progress=False), 3 * len(qt))
    rows.append({"engine": "bm25s", "query_ms": bm_ms, "build_s": build, "add_one_ms": 1e3 * build,
                 "note": "no incremental add: the index is rebuilt"})

    import tantivy

    sb = tantivy.SchemaBuilder()
    sb.add_text_field("id", stored=True)
    sb.add_text_field("body", stored=False)
    schema = sb.build()
    (workdir / "tantivy").mkdir()
    index = tantivy.Index(schema, path=str(workdir / "tantivy"))
    t0 = time.perf_counter()
    w = index.writer()
    for i, t in enumerate(texts):
        w.add_document(tantivy.Document(id=f"e{i}", body=t))
    w.commit()
    index.reload()
    build = time.perf_counter() - t0
    searcher = index.searcher()
    parsed = []
    for x in queries:
        terms = fts_query(x)
        parsed.append(index.parse_query(terms.replace('"', "").replace(" OR ", " ") if terms else "x", ["body"]))
    it = iter(range(10 ** 9))
    tv_ms = _median_ms(lambda: searcher.search(parsed[next(it) % len(parsed)], 3).hits, 3 * len(parsed))

    def add_tv():
        w.add_document(tantivy.Document(id=f"n{time.time_ns()}", body=texts[0]))
        w.commit()

    tv_add = _median_ms(add_tv, 10)
    rows.append({"engine": "tantivy", "query_ms": tv_ms, "build_s": build, "add_one_ms": tv_add})
    return rows


def bench_generation(base, bank, prompts: list[str], max_new: int) -> dict:
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

    res = {}
    for name, fn in [("hf_greedy", hf_each), ("dmoe_tau_inf", lambda: ours_each(math.inf)),
                     ("dmoe_tau_2", lambda: ours_each(2.0))]:
        fn()  # warm
        t0 = time.perf_counter()
        n = fn()
        res[name + "_ms_per_token"] = 1e3 * (time.perf_counter() - t0) / n
    gens = dmoe.generate(prompts, max_new, tau=2.0)
    res["triggers_per_sequence"] = statistics.mean(len(g.triggers) for g in gens)
    t0 = time.perf_counter()
    n = sum(len(g.tokens) for g in dmoe.generate(prompts, max_new, tau=2.0))
    batch_tps = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    n = ours_each(2.0)
    seq_tps = n / (time.perf_counter() - t0)
    res.update(batch8_tokens_per_s=batch_tps, sequential8_tokens_per_s=seq_tps, batch_speedup=batch_tps / seq_tps,
               trigger_overhead=res["dmoe_tau_2_ms_per_token"] / res["hf_greedy_ms_per_token"])
    return res


def run(device: str) -> list[dict]:
    if device != "cpu":
        return []  # the DMoE loop is measured on the CPU; CUDA runs of it are not set up yet
    from doe_ext.dmoe import ExpertBank, LoRAConfig, load_base, qa_prompt

    base = load_base("smollm2-135m")
    passages = debian_passages(PAPER_BANK + 200)
    rows = []
    docs = passages[:16]
    for epochs in (1, 5):
        r = bench_training(base, docs, epochs)
        rows.append({"bench": "dmoe_train", "shape": f"SmolLM2-135M, 16 docs, {r['tokens_per_expert']:.0f} tok/expert, "
                     f"epochs {epochs}, rank 4", "dtype": "float32", "device": device,
                     "ms": {"ours_per_expert": round(1e3 * r["ours_s"], 1), "peft_per_expert": round(1e3 * r["peft_s"], 1)},
                     "speedup": {"vs_peft": round(r["speedup"], 2)},
                     "flop_floor_gflop_per_expert": round(r["flop_floor_gflop"], 2)})
    work = Path(tempfile.mkdtemp(prefix="bench-dmoe-"))
    try:
        surrogates = [t for _, t in passages[:PAPER_BANK]]
        tok = base.tokenizer
        held = [t for _, t in passages[PAPER_BANK:PAPER_BANK + 200]]
        # Routing queries at their longest: 128 tokens of held-out records (DMoE cuts queries to 128).
        queries = [tok.decode(tok(" ".join(held[i:i + 8]), add_special_tokens=False)["input_ids"][-128:])
                   for i in range(0, 192, 2)]
        for r in bench_routing(surrogates, queries, work):
            rows.append({"bench": "dmoe_route", "shape": f"{len(surrogates)} surrogates, top-3, <=128-token queries",
                         "dtype": "-", "device": device, "engine": r["engine"],
                         "ms": {"query": round(r["query_ms"], 3), "add_one": round(r["add_one_ms"], 3)},
                         "build_s": round(r["build_s"], 2), **({"note": r["note"]} if "note" in r else {})})
        bank = ExpertBank(work / "bank", create=True, fingerprint=base.fingerprint, base_name="smollm2-135m",
                          lora=LoRAConfig())
        gen = torch.Generator().manual_seed(0)
        for pkg, text in passages[:64]:
            e = {}
            for n, (o, i) in base.last.shapes().items():
                e[f"{n}.lora_a"] = torch.randn(4, i, generator=gen) / i ** 0.5
                e[f"{n}.lora_b"] = torch.randn(o, 4, generator=gen) * 1e-3
            bank.add(pkg, e, text, text)
        raw = sum(v.numel() * 4 for v in e.values())
        size = statistics.mean((bank.path / "experts" / r.file).stat().st_size for r in bank.rows())
        ids = bank.ids()
        names = base.last.projection_names
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
                     "speedup": {"batch8_vs_sequential": round(g["batch_speedup"], 2)},
                     "trigger_overhead_vs_hf": round(g["trigger_overhead"], 3),
                     "triggers_per_sequence": g["triggers_per_sequence"],
                     "tokens_per_s": {"batch8": round(g["batch8_tokens_per_s"], 1),
                                      "sequential8": round(g["sequential8_tokens_per_s"], 1)}})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    import json

    print(json.dumps(run("cpu"), indent=1))
