"""The expert bank: rows, weights, BM25 routing, integrity checks and crash safety."""
import io
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from dmoe_testing import DOCS, random_bank, random_expert, write_docs
from doe_ext.dmoe import BankError, ExpertBank, LoRAConfig, Recipe
from doe_ext.dmoe.bank import DB, query_terms


@pytest.fixture
def bank(base, tmp_path):
    return random_bank(base, tmp_path / "bank")


def test_round_trip_and_listing(base, bank):
    assert len(bank) == len(DOCS) and bank.ids() == [d["id"] for d in DOCS]
    assert "otter" in bank and "walrus" not in bank
    gen = torch.Generator().manual_seed(0)
    first = random_expert(base, gen, 4)
    got = bank.get("otter")
    assert set(got) == set(first)
    for k in first:
        assert torch.equal(got[k], first[k])
    assert bank.row("otter").text == DOCS[0]["text"]
    assert bank._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s = bank.load(["fugue", "otter"], base.site.names)
    assert s.num_experts == 2 and torch.equal(s.a[base.site.names[0]][1], first[f"{base.site.names[0]}.lora_a"])
    assert "experts=5" in repr(bank)
    page = bank._repr_html_(rows=2)
    assert "5 experts" in page and page.count("<tr>") == 3 and "... 3 more" in page


def test_equal_experts_are_equal_files(base, tmp_path):
    """Experts are content-addressed: the same weights give the same bytes and file name every time
    (safetensors writes its metadata in a hash map's order, which changes from call to call; 24 saves
    would all agree by chance with probability 2^-23), and the file reads back as safetensors."""
    from safetensors import safe_open

    bank = ExpertBank(tmp_path / "b", create=True, fingerprint=base.fingerprint, recipe=Recipe())
    e = random_expert(base, torch.Generator().manual_seed(2), 4)
    names = set()
    for _ in range(24):
        bank.add("x", e, "t", "t")
        names.add(bank._db.execute("SELECT file FROM experts WHERE id = 'x'").fetchone()[0])
    assert len(names) == 1
    (path,) = (bank.path / "experts").iterdir()
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"id": "x", "fingerprint": base.fingerprint}
        assert all(torch.equal(f.get_tensor(k), e[k]) for k in e)
    assert all(torch.equal(v, e[k]) for k, v in bank.get("x").items())


def test_bf16_weights(base, tmp_path):
    bank = ExpertBank(tmp_path / "b", create=True, fingerprint=base.fingerprint, recipe=Recipe(), dtype="bfloat16")
    e = random_expert(base, torch.Generator().manual_seed(1), 4)
    bank.add("x", e, "t", "t")
    for k, v in bank.get("x").items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, e[k].bfloat16().float(), atol=0, rtol=0)
    with pytest.raises(BankError, match="`dtype` must be one of"):
        ExpertBank(tmp_path / "c", create=True, fingerprint="f", recipe=Recipe(), dtype="float16")


def test_bm25_routing(bank):
    assert bank.route("volcanic lava rock", 1) == ["basalt"]
    assert bank.route("music melody voices", 2)[0] == "fugue"
    assert set(bank.route("sea", 5)) == {"otter", "sextant"}  # only documents with the term match
    assert bank.route("xylophone zebra", 3) == [] and bank.route("!!! ...", 3) == []
    assert query_terms('A "quoted" AND b_c, a naïve dict-gcide') == ["a", "quoted", "and", "b", "c", "naïve", "dict",
                                                                     "gcide"]
    with pytest.raises(ValueError, match=r"^ExpertBank.route: `k` must be >= 1, got 0$"):
        bank.route("sea", 0)
    with pytest.raises(ValueError, match=r"^ExpertBank.search: `k` must be >= 1, got -1$"):
        bank.search("sea", -1)


def test_remove_and_replace_touch_one_expert(base, bank):
    before = {i: bank.row(i).checksum for i in bank.ids()}
    bank.remove(["basalt"])
    assert "basalt" not in bank and bank.route("volcanic lava", 3) == []
    assert len(list((bank.path / "experts").iterdir())) == len(DOCS) - 1
    with pytest.raises(KeyError, match="no expert with id 'basalt'"):
        bank.remove(["basalt"])
    old_file = bank.row("fugue").file
    bank.add("fugue", random_expert(base, torch.Generator().manual_seed(9), 4), "new text", "glacier ice")
    assert bank.route("glacier", 1) == ["fugue"] and bank.route("melody voices", 3) == []
    assert not (bank.path / "experts" / old_file).exists()
    assert {i: bank.row(i).checksum for i in bank.ids() if i != "fugue"} == {
        i: c for i, c in before.items() if i not in ("fugue", "basalt")}


def test_integrity_checks(base, bank):
    path = bank.path / "experts" / bank.row("otter").file
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(BankError, match="expert 'otter'.*has sha256 .* its row says"):
        bank.get("otter")
    db = sqlite3.connect(bank.path / DB)
    with db:
        db.execute("UPDATE experts SET file = '../../escape.safetensors' WHERE id = 'tort'")
        db.execute("UPDATE experts SET fingerprint = 'other' WHERE id = 'fugue'")
    with pytest.raises(BankError, match="expert 'tort' names the file '../../escape.safetensors'"):
        bank.get("tort")
    with pytest.raises(BankError, match="expert 'fugue' was trained for base fingerprint other"):
        bank.get("fugue")
    # A pickle whose checksum the row agrees with is still refused: safetensors only.
    buf = io.BytesIO()
    torch.save({"x": torch.zeros(1)}, buf)
    p = bank.path / "experts" / bank.row("sextant").file
    p.write_bytes(buf.getvalue())
    import hashlib
    with db:
        db.execute("UPDATE experts SET checksum = ? WHERE id = 'sextant'", (hashlib.sha256(buf.getvalue()).hexdigest(),))
    with pytest.raises(BankError, match="is not a safetensors file"):
        bank.get("sextant")
    with pytest.raises(KeyError, match="no expert with id 'walrus'"):
        bank.get("walrus")


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "a\\b", "tab\there"])
def test_bad_ids_are_refused(base, bank, bad):
    with pytest.raises(BankError, match="invalid expert id"):
        bank.add(bad, random_expert(base, torch.Generator(), 4), "t", "t")


def test_index_survives_a_crash_before_its_commit(base, bank):
    """What a crash between a row's commit and the index's leaves is finished when the bank opens again: a
    row not yet indexed gets indexed, a pending deletion reaches the index. An id without a row is never
    routed to, even while the index still has it."""
    db = sqlite3.connect(bank.path / DB)
    with db:
        db.execute("UPDATE experts SET indexed = 0 WHERE id = 'basalt'")
        db.execute("DELETE FROM experts WHERE id = 'fugue'")
        db.execute("INSERT INTO removals VALUES ('fugue')")
    bank._index_update(remove=["basalt"])  # as if the index never saw it
    assert bank.route("melody voices", 3) == [] and bank.route("volcanic lava", 3) == []
    docs_before = bank._index.searcher().num_docs
    bank.close()
    again = ExpertBank(bank.path)
    assert again.route("volcanic lava", 1) == ["basalt"]
    assert again._index.searcher().num_docs == docs_before  # basalt in, fugue out
    assert db.execute("SELECT count(*) FROM removals").fetchone()[0] == 0
    again.reindex()
    assert again._index.searcher().num_docs == len(DOCS) - 1 and again.route("volcanic lava", 1) == ["basalt"]


def test_second_writer_is_refused(base, bank):
    writer = bank._index.writer(15_000_000, 1)  # another process holding the index lock
    try:
        with pytest.raises(BankError, match="is being written by another process"):
            bank.add("x", random_expert(base, torch.Generator(), 4), "t", "t")
    finally:
        writer.wait_merging_threads()
    assert "x" in bank and bank.route("t", 1) == []  # the row is committed, not yet indexed...
    bank.reconcile()
    assert bank.route("t", 1) == ["x"]  # ...until the next write or open


def test_open_and_create_errors(base, bank, tmp_path):
    with pytest.raises(FileNotFoundError, match="no bank here"):
        ExpertBank(tmp_path / "nothing")
    with pytest.raises(BankError, match=r"another recipe: lora.rank=4 \(asked: 8\)"):
        ExpertBank(bank.path, create=True, fingerprint=base.fingerprint, recipe=Recipe(lora=LoRAConfig(rank=8)))
    with pytest.raises(BankError, match="already holds a bank for fingerprint"):
        ExpertBank(bank.path, create=True, fingerprint="other", recipe=Recipe())
    again = ExpertBank(bank.path, create=True, fingerprint=base.fingerprint, recipe=Recipe())  # same config: opens
    assert len(again) == len(DOCS)
    with pytest.raises(BankError, match="needs the base model's `fingerprint`"):
        ExpertBank(tmp_path / "x", create=True)


def test_garbage_collection(bank):
    folder = bank.path / "experts"
    (folder / ".tmp-123.safetensors").write_bytes(b"x")
    (folder / ("0" * 16 + "-" + "1" * 16 + ".safetensors")).write_bytes(b"x")
    (folder / "user-notes.txt").write_text("kept")
    assert bank.collect_garbage() == 2
    assert (folder / "user-notes.txt").exists() and len(list(folder.glob("*.safetensors"))) == len(DOCS)


def test_size_per_expert_is_the_parameter_bytes(tmp_path):
    """SmolLM2-135M's last MLP (d = 576, ffn = 1536), rank 4: the file is the raw fp32 bytes plus a header."""
    shapes = {"gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
    e = {}
    for n, (o, i) in shapes.items():
        e[f"{n}.lora_a"], e[f"{n}.lora_b"] = torch.randn(4, i), torch.randn(o, 4)
    bank = ExpertBank(tmp_path / "b", create=True, fingerprint="f", recipe=Recipe())
    bank.add("doc", e, "t", "t")
    raw = sum(v.numel() * 4 for v in e.values())
    size = (bank.path / "experts" / bank.row("doc").file).stat().st_size
    assert raw <= size <= 1.02 * raw


def _build_cmd(docs, bank_dir, base_dir):
    return [sys.executable, "-m", "doe_ext.cli", "dmoe", "build", str(docs), "--out", str(bank_dir), "--base",
            str(base_dir), "--recipe", "paper", "--augment", "none", "--epochs", "2", "--lr", "1e-2", "--group-size", "2"]


def _snapshot(bank_dir):
    bank = ExpertBank(bank_dir)
    out = {i: (bank.row(i).surrogate, bank.get(i)) for i in bank.ids()}
    files = sorted(p.name for p in (bank.path / "experts").iterdir())
    routes = [bank.route(bank.row(i).text, 1) for i in bank.ids()]
    bank.close()
    return out, files, routes


def test_sigkill_at_any_point_then_rerun_gives_the_same_bank(llama_dir, tmp_path):
    docs = [{"id": f"{d['id']}-{k}", "text": f"{d['text']} Note {k}."} for k in range(4) for d in DOCS]
    path = write_docs(tmp_path / "docs.jsonl", docs)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_build_cmd(path, tmp_path / "clean", llama_dir), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    for threshold, delay in [(0, 0.0), (3, 0.05), (8, 0.013), (13, 0.2)]:
        proc = subprocess.Popen(_build_cmd(path, killed, llama_dir), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            try:
                n = sqlite3.connect(killed / DB).execute("SELECT count(*) FROM experts").fetchone()[0]
            except sqlite3.Error:
                n = -1
            if n >= threshold:
                time.sleep(delay)
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(_build_cmd(path, killed, llama_dir), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (a, files_a, routes_a), (b, files_b, routes_b) = _snapshot(tmp_path / "clean"), _snapshot(killed)
    assert list(a) == list(b) == [d["id"] for d in docs]
    assert routes_a == routes_b
    assert len(files_a) == len(files_b) == len(docs)  # no orphans, no temporary files
    for i in a:
        assert a[i][0] == b[i][0]
        for k in a[i][1]:
            torch.testing.assert_close(a[i][1][k], b[i][1][k], atol=1e-5, rtol=1e-5)


def test_recipe_round_trip(base, tmp_path):
    """The recipe a bank is made with is the one it reopens with, every field of it."""
    recipe = Recipe(lora=LoRAConfig(8, 32.0), objective="distill", augment="qa", lr=1e-3, epochs=7, batch_size=2,
                    weight_decay=0.1, max_length=256, seed=5, instances=("chunks", "questions"), answer_tokens=12,
                    hidden_weight=0.5)
    ExpertBank(tmp_path / "b", create=True, fingerprint=base.fingerprint, recipe=recipe).close()
    again = ExpertBank(tmp_path / "b")
    assert again.recipe == recipe and again.lora == LoRAConfig(8, 32.0)
    assert Recipe.from_json(recipe.to_json()) == recipe
    gen = torch.Generator().manual_seed(0)
    again.add("otter", random_expert(base, gen, 8), DOCS[0]["text"], DOCS[0]["text"])
    assert Recipe.from_json(again.row("otter").config) == recipe  # each row names its recipe too


def test_another_recipe_is_refused_by_name(base, tmp_path):
    ExpertBank(tmp_path / "b", create=True, fingerprint=base.fingerprint, recipe=Recipe(lr=1e-3)).close()
    other = Recipe(lr=2e-3, objective="distill", augment="qa", instances=("subject",))
    with pytest.raises(BankError) as e:
        ExpertBank(tmp_path / "b", create=True, fingerprint=base.fingerprint, recipe=other)
    msg = str(e.value)
    for field in ("augment='none' (asked: 'qa')", "instances=[] (asked: ['subject'])", "lr=0.001 (asked: 0.002)",
                  "objective='next_token' (asked: 'distill')"):
        assert field in msg
    assert "epochs" not in msg  # only what differs is named
    with pytest.raises(BankError, match=r"objective='next_token' \(asked: 'distill'\)"):
        ExpertBank(tmp_path / "b").check_recipe(other)


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "`epochs` must be a positive int"), ({"lr": 0.0}, "`lr` must be > 0"),
    ({"objective": "mse"}, "`objective` must be one of"), ({"augment": "gpt"}, "`augment` must be one of"),
    ({"objective": "distill"}, "needs at least one kind in `instances`"),
    ({"objective": "distill", "instances": ("questions",)}, "'questions' but `augment` is 'none'"),
    ({"instances": ("chunks",)}, "belong to the distill objective"),
    ({"objective": "distill", "instances": ("poems",)}, "`instances` must be drawn from"),
    ({"hidden_weight": -1.0}, "`hidden_weight` must be >= 0"), ({"answer_tokens": 0}, "`answer_tokens` must be"),
    ({"distill_loss": "mse"}, "`distill_loss` must be one of"),
    ({"distill_loss": "sequence"}, "`distill_loss` belong to the distill objective"),
    ({"objective": "distill", "instances": ("subject",), "distill_loss": "sequence", "hidden_weight": 1.0},
     "`hidden_weight` needs the teacher's hidden states"),
])
def test_bad_recipes_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**kwargs)


def test_next_token_version_of_a_distill_recipe():
    d = Recipe(objective="distill", augment="qa", instances=("subject",), hidden_weight=0.5, lr=1e-3)
    n = d.next_token(augment="none")
    assert (n.objective, n.instances, n.hidden_weight, n.distill_loss, n.augment, n.lr) == (
        "next_token", (), 0.0, "kl", "none", 1e-3)


def test_recipe_from_dict_refuses_unknown_fields():
    with pytest.raises(ValueError, match="unknown field 'rank'"):
        Recipe.from_dict({"rank": 4})


def test_search_scores_are_bm25_order(bank):
    hits = bank.search("volcanic lava rock sea", 3)
    assert [h for h, _ in hits] == bank.route("volcanic lava rock sea", 3) and hits[0][0] == "basalt"
    assert all(a[1] >= b[1] > 0 for a, b in zip(hits, hits[1:]))
