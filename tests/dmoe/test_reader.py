"""The knowledge reader: its path against the no-cache merged reference, its training against a loss the
reference computes, its place in a bank (round trip, integrity, refusal of another base or recipe), and
its command line."""
import copy
import json
import math

import pytest
import torch

from dmoe_testing import DOCS, QUESTIONS, random_bank, random_expert, write_docs
from test_generate import plain_merge, reference_generate, split_tau
from doe_ext.cli import main
from doe_ext.dmoe import BankError, DMoE, ExpertBank, ExpertSite, LoRAConfig, qa_prompt
from doe_ext.dmoe.evaluate import Harness, evaluate
from doe_ext.dmoe.experts import ExpertSet, set_linear_weight
from doe_ext.dmoe.reader import READER_ID, Reader, ReaderError, ReaderRecipe
from doe_ext.dmoe.reader_training import routed_set, train_reader

QA = [{"question": "What does the sea otter crack?", "answers": ["shellfish"], "doc_id": "otter"},
      {"question": "What is basalt formed from?", "answers": ["lava"], "doc_id": "basalt"},
      {"question": "What imitates the melody in a fugue?", "answers": ["voices"], "doc_id": "fugue"},
      {"question": "What does a tort cause?", "answers": ["loss or harm"], "doc_id": "tort"},
      {"question": "What does a sextant measure?", "answers": ["the angle"], "doc_id": "sextant"}]


def random_reader(base, bank, rank=8, alpha=8.0, seed=7) -> Reader:
    """A reader of another rank than the bank's experts (4), with non-zero factors."""
    tensors = random_expert(base, torch.Generator().manual_seed(seed), rank, std=0.4)
    return Reader(tensors, LoRAConfig(rank, alpha), bank.fingerprint, bank.recipe, "test-reader")


@pytest.fixture
def bank(base, tmp_path):
    return random_bank(base, tmp_path / "bank")


@pytest.fixture
def read_bank(base, bank):
    bank.set_reader(random_reader(base, bank))
    return bank


@pytest.mark.parametrize("compose", ["score", "sum"])
@pytest.mark.parametrize("tau", [0.0, "mid"])
def test_equals_no_cache_merged_reference(base, read_bank, tau, compose):
    """Experts and reader through the cached, re-predicting path == the reference that merges both into
    the weights and re-runs the whole sequence at every step."""
    dmoe = DMoE(base, read_bank, top_k=3, compose=compose)
    assert dmoe.reader is not None
    if tau == "mid":
        tau = split_tau(dmoe, 10)
    n_trig = 0
    for q in QUESTIONS:
        got = dmoe.generate(q, max_new_tokens=10, tau=tau)[0]
        ref, ref_triggers = reference_generate(base, read_bank, q, 10, tau, 3, compose=compose,
                                               reader=read_bank.reader())
        assert got.tokens == ref
        assert [(t.position, t.experts) for t in got.triggers] == [(p, e) for p, e, _ in ref_triggers]
        assert all(READER_ID not in t.experts for t in got.triggers)  # the trace names experts only
        n_trig += len(got.triggers)
    assert n_trig > 0


def test_batch_with_a_reader_equals_each_alone(base, read_bank):
    dmoe = DMoE(base, read_bank, top_k=2)
    batch = dmoe.generate(QUESTIONS, max_new_tokens=8, tau=0.0)
    for q, g in zip(QUESTIONS, batch):
        assert g.tokens == dmoe.generate(q, max_new_tokens=8, tau=0.0)[0].tokens


def test_the_reader_changes_the_output_and_can_be_left_out(base, bank, read_bank):
    """With its reader the answers differ; ``reader=False`` is the bank without one; a run that never
    triggers is the base model either way (the reader joins experts, never runs alone)."""
    plain = DMoE(base, random_bank(base, bank.path.parent / "plain"), top_k=3)
    assert plain.reader is None
    off = DMoE(base, read_bank, top_k=3, reader=False)
    on = DMoE(base, read_bank, top_k=3)
    tokens = {k: [d.generate(q, max_new_tokens=8, tau=0.0)[0].tokens for q in QUESTIONS]
              for k, d in (("plain", plain), ("off", off), ("on", on))}
    assert tokens["off"] == tokens["plain"] and tokens["on"] != tokens["off"]
    assert [on.generate(q, 8, tau=math.inf)[0].tokens for q in QUESTIONS] == \
           [off.generate(q, 8, tau=math.inf)[0].tokens for q in QUESTIONS]


def test_expert_sets_of_mixed_ranks_keep_their_deltas(base, bank):
    """Stacking a rank-4 expert with a rank-8 reader pads with zeros: every delta B @ A is unchanged."""
    r = random_reader(base, bank)
    e = bank.get("otter")
    s = ExpertSet.stack([e, r.tensors], base.site.names)
    assert s.rank == 8
    for n in base.site.names:
        torch.testing.assert_close(s.b[n][0] @ s.a[n][0], e[f"{n}.lora_b"] @ e[f"{n}.lora_a"])
        torch.testing.assert_close(s.b[n][1] @ s.a[n][1], r.tensors[f"{n}.lora_b"] @ r.tensors[f"{n}.lora_a"])


def test_bank_round_trip_and_integrity(base, bank):
    r = random_reader(base, bank)
    assert bank.reader() is None
    bank.set_reader(r)
    again = ExpertBank(bank.path).reader()
    assert again.name == "test-reader" and again.lora == r.lora and again.fingerprint == bank.fingerprint
    assert again.recipe == bank.recipe and all(torch.equal(again.tensors[k], r.tensors[k]) for k in r.tensors)
    files = list((bank.path / "reader").iterdir())
    assert [f.name for f in files] == [r.checksum[:32] + ".safetensors"]  # content-addressed
    assert "reader='test-reader'" in repr(bank) and "reader 'test-reader'" in bank._repr_html_()
    other = random_reader(base, bank, seed=8)
    bank.set_reader(other)  # replaces: the old file goes
    assert [f.name for f in (bank.path / "reader").iterdir()] == [other.checksum[:32] + ".safetensors"]
    data = bytearray(files[0].parent.joinpath(other.checksum[:32] + ".safetensors").read_bytes())
    data[-1] ^= 1
    (bank.path / "reader" / (other.checksum[:32] + ".safetensors")).write_bytes(bytes(data))
    with pytest.raises(BankError, match=f"ExpertBank: {bank.path}: the reader: {bank.path}/reader/{other.checksum[:32]}"
                                        rf"\.safetensors has sha256 [0-9a-f]{{64}}, its row says {other.checksum}"):
        bank.reader()
    (bank.path / "reader" / (other.checksum[:32] + ".safetensors")).unlink()
    with pytest.raises(BankError, match=f"the reader: weight file {bank.path}/reader/.* is missing"):
        bank.reader()
    assert bank.remove_reader() and bank.reader() is None and not bank.remove_reader()
    assert list((bank.path / "reader").iterdir()) == []


def test_a_reader_of_another_base_or_recipe_is_refused_by_name(base, bank, tmp_path):
    r = random_reader(base, bank)
    stranger = copy.copy(r)
    stranger.fingerprint = "0" * 32
    with pytest.raises(ReaderError, match=f"reader 'test-reader' was trained for base fingerprint 0{{32}}, but the "
                                          f"bank {bank.path} is for {bank.fingerprint}"):
        bank.set_reader(stranger)
    other = copy.copy(r)
    other.recipe = bank.recipe.replace(epochs=3, lr=1e-2)
    with pytest.raises(ReaderError, match=r"trained for experts of another recipe than the bank .*'s: "
                                          r"epochs=3 \(bank .*: 1\), lr=0.01 \(bank .*: 0.0003\)"):
        bank.set_reader(other)
    with pytest.raises(ReaderError, match="another recipe"):
        DMoE(base, bank, reader=other)
    assert bank.reader() is None  # nothing was stored
    (tmp_path / "not-a-reader.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}      ")
    with pytest.raises(ReaderError, match="not-a-reader.safetensors: format None, expected 'doe_ext.dmoe.reader/1'"):
        Reader.load(tmp_path / "not-a-reader.safetensors")


def test_routed_set_has_the_gold_expert_and_bm25_distractors(bank):
    s = routed_set(bank, "What is basalt formed from?", "sextant", 3)
    ids = [e for e, _ in s]
    assert "sextant" in ids and len(ids) == 3 and len(set(ids)) == 3
    assert sum(w for _, w in s) == pytest.approx(1.0)  # the default composition, score
    assert [e for e, _ in routed_set(bank, "basalt lava rock", "basalt", 2)][0] == "basalt"


def answer_loss(base, bank, reader, qa) -> float:
    """Mean answer cross-entropy with the routed experts and the reader merged into the weights (no
    cache, the whole sequence run once): what the reader is trained to lower, computed without any of
    the training code."""
    model = copy.deepcopy(base.model)
    site = ExpertSite(model)
    theta = {n: w.detach().clone() for n, w in site.weights().items()}
    tok, total = base.tokenizer, 0.0
    for q in qa:
        s = routed_set(bank, q["question"], q["doc_id"], 3)
        merged = plain_merge(theta, [bank.get(e) for e, _ in s], [w for _, w in s], bank.lora.scale)
        if reader is not None:
            merged = plain_merge(merged, [reader.tensors], [1.0], reader.lora.scale)
        for n, w in merged.items():
            set_linear_weight(site.modules()[n], w)
        prompt = tok(qa_prompt(tok, q["question"]))["input_ids"]
        answer = tok(" " + q["answers"][0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        total += -logp.gather(1, torch.tensor(answer)[:, None]).mean().item()
    return total / len(qa)


def test_training_lowers_the_answer_loss(base, bank):
    """Closed-book instances only (with_document=0), so the reference loss sees what training saw."""
    before = answer_loss(base, bank, None, QA)
    r = train_reader(base, bank, QA, ReaderRecipe(epochs=30, batch_size=2, lr=3e-3, with_document=0.0))
    after = answer_loss(base, bank, r, QA)
    assert after < 0.7 * before, (before, after)
    assert r.fingerprint == bank.fingerprint and r.recipe == bank.recipe and r.lora == LoRAConfig(16, 32.0)
    assert r.info["questions"] == len(QA) and r.info["documents"] == len(QA)


def test_training_refuses_a_question_without_an_expert(base, bank):
    with pytest.raises(ReaderError, match="question 0 .* names doc_id 'walrus', which has no expert in"):
        train_reader(base, bank, [{"question": "Who?", "answers": ["x"], "doc_id": "walrus"}])
    with pytest.raises(ReaderError, match="`with_document` must be in \\[0, 1\\], got 2"):
        ReaderRecipe(with_document=2)


def test_the_reader_control_method(base, bank, read_bank):
    """``reader`` answers closed book with the reader alone: the generation DMoE makes with the reader's
    slot active from the first token; a bank without a reader refuses the method by name."""
    h = Harness(base, read_bank, max_new_tokens=6)
    got = evaluate(h, QA[:2], ["reader"], progress=False)["reader"]
    want = DMoE(base, read_bank).generate([h.prompt(q["question"]) for q in QA[:2]], 6, tau=math.inf,
                                          experts=[[(READER_ID, read_bank.reader().weight(read_bank.lora.scale))]] * 2,
                                          stop_tokens=h.stop)
    assert [s.prediction for s in got] == [g.text.split("\n")[0].strip() for g in want]
    with pytest.raises(ValueError, match="method 'reader' needs a knowledge reader, and .* has none"):
        evaluate(Harness(base, random_bank(base, bank.path.parent / "plain")), QA[:1], ["reader"], progress=False)


def run(capsys, *argv):
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_reader_train_add_ask_rm(llama_dir, tmp_path, capsys):
    docs = write_docs(tmp_path / "docs.jsonl", DOCS)
    code, _, err = run(capsys, "dmoe", "build", docs, "--out", tmp_path / "train", "--base", llama_dir, "--recipe",
                       "paper", "--augment", "none", "--no-progress")
    assert code == 0, err
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({**q, "split": "train" if i < 4 else "dev"}) + "\n" for i, q in enumerate(QA)))
    code, out, err = run(capsys, "dmoe", "reader", "train", tmp_path / "train", qa, "--out", tmp_path / "r.safetensors",
                         "--split", "train", "--epochs", 1, "--rank", 4, "--no-progress")
    assert code == 0, err
    assert "reader 'r' trained on 4 questions about 4 documents" in out
    r = Reader.load(tmp_path / "r.safetensors")
    assert r.lora.rank == 4 and r.info["reader_recipe"]["epochs"] == 1
    code, out, err = run(capsys, "dmoe", "reader", "add", tmp_path / "train", tmp_path / "r.safetensors")
    assert code == 0 and "knowledge reader 'r' installed" in out, err
    asked = {}
    for flag in ((), ("--no-reader",)):
        code, out, err = run(capsys, "dmoe", "ask", tmp_path / "train", "What is basalt?", "--tau", 0,
                             "--max-new-tokens", 4, "--json", *flag)
        assert code == 0, err
        asked[flag] = json.loads(out)
    code, out, err = run(capsys, "dmoe", "eval", tmp_path / "train", qa, "--methods", "reader,dmoe", "--no-progress",
                         "--max-new-tokens", 4)
    assert code == 0 and "| reader | 5 |" in out and "| dmoe | 5 |" in out, err
    code, out, _ = run(capsys, "dmoe", "reader", "rm", tmp_path / "train")
    assert code == 0 and "reader removed" in out
    code, out, _ = run(capsys, "dmoe", "reader", "rm", tmp_path / "train")
    assert code == 0 and "no reader to remove" in out
    code, _, err = run(capsys, "dmoe", "eval", tmp_path / "train", qa, "--methods", "reader", "--no-progress")
    assert code == 2 and "method 'reader' needs a knowledge reader" in err


def test_cli_refuses_a_reader_of_another_recipe(llama_dir, tmp_path, capsys):
    docs = write_docs(tmp_path / "docs.jsonl", DOCS[:2])
    for name, epochs in (("a", 1), ("b", 2)):
        code, _, err = run(capsys, "dmoe", "build", docs, "--out", tmp_path / name, "--base", llama_dir, "--recipe",
                           "paper", "--augment", "none", "--epochs", epochs, "--no-progress")
        assert code == 0, err
    bank_a = ExpertBank(tmp_path / "a")
    r = Reader({}, LoRAConfig(4, 8.0), bank_a.fingerprint, bank_a.recipe, "for-a")
    r.save(tmp_path / "for-a.safetensors")
    code, _, err = run(capsys, "dmoe", "reader", "add", tmp_path / "b", tmp_path / "for-a.safetensors")
    assert code == 2 and "reader 'for-a' was trained for experts of another recipe" in err and "epochs=1 (bank" in err
    for argv, message in ([tmp_path / "none.jsonl", "--out", tmp_path / "x"], "none.jsonl: no such file"), (
            [docs, "--out", tmp_path / "no" / "r.st"],
            f"--out: {tmp_path / 'no' / 'r.st'}: the folder {tmp_path / 'no'} does not exist"), (
            [docs, "--out", tmp_path / "r.st", "--with-document", 2], "--with-document: must be >= 0.0 and <= 1.0, got 2"):
        with pytest.raises(SystemExit) as e:  # refused while parsing
            run(capsys, "dmoe", "reader", "train", tmp_path / "a", *argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    code, _, err = run(capsys, "dmoe", "reader", "train", tmp_path / "a", docs, "--out", tmp_path / "r.st",
                       "--split", "train")
    assert code == 2 and "docs.jsonl:1: expected {\"question\": str" in err  # documents are not questions
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(q) + "\n" for q in QA[:2]))
    code, _, err = run(capsys, "dmoe", "reader", "train", tmp_path / "a", qa, "--out", tmp_path / "r.st",
                       "--split", "dev")
    assert code == 2 and "qa.jsonl: no questions of split 'dev'" in err
    assert not (tmp_path / "r.st").exists()


def test_build_installs_the_shipped_reader_of_its_base_and_recipe(llama_dir, tmp_path, capsys, monkeypatch):
    """A reader shipped for the base and recipe (here a folder standing in for the package's) is
    installed by ``build``; ``--no-reader`` leaves it out, and a reader of another recipe is not taken."""
    import doe_ext.dmoe.reader as reader_module  # the package's readers folder, pointed elsewhere

    docs = write_docs(tmp_path / "docs.jsonl", DOCS[:2])
    argv = ["dmoe", "build", docs, "--base", llama_dir, "--recipe", "paper", "--augment", "none", "--no-progress"]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "first")
    assert code == 0, err
    first = ExpertBank(tmp_path / "first")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    tensors = {k: v + 0.01 for k, v in first.get("otter").items()}
    Reader(tensors, first.lora, first.fingerprint, first.recipe, "shipped-one").save(shipped / "a.safetensors")
    Reader(tensors, first.lora, first.fingerprint, first.recipe.replace(epochs=5), "other").save(shipped / "b.safetensors")
    monkeypatch.setattr(reader_module, "SHIPPED", shipped)
    code, out, err = run(capsys, *argv, "--out", tmp_path / "second")
    assert code == 0 and "knowledge reader 'shipped-one' installed" in out, err
    assert ExpertBank(tmp_path / "second").reader().name == "shipped-one"
    code, out, err = run(capsys, *argv, "--out", tmp_path / "third", "--no-reader")
    assert code == 0 and "reader" not in out and ExpertBank(tmp_path / "third").reader() is None, err
    (shipped / "a.safetensors").unlink()
    code, out, err = run(capsys, *argv, "--out", tmp_path / "fourth")
    assert code == 0 and "reader" not in out and ExpertBank(tmp_path / "fourth").reader() is None, err
