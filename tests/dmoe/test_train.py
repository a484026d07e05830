"""Batched expert training against one-at-a-time training and a PEFT-style reference loop."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmoe_testing import DOCS
from doe_ext.dmoe import Augmentation, Document, ExpertSite, LoRAConfig, Recipe, load_base, train_experts
from doe_ext.dmoe.distill import SHUFFLES, SUBJECT_PROMPTS, distill_instances, sentences
from doe_ext.dmoe.instances import Instance, training_instances
from doe_ext.dmoe.train import _prefix_groups, chunked_loss, expert_seed, hidden_l1, residuals

AUG = Augmentation(kind="model", rewrite="A sea otter lies on its back and breaks shellfish with a stone.",
                   qa=[{"question": "What does the otter float on?", "answer": "its back", "full_answer": "its back"},
                       {"question": "What does it crack?", "answer": "shellfish", "full_answer": "shellfish"},
                       {"question": "Where is the stone?", "answer": "on its chest", "full_answer": "on its chest"}])


def docs(n, aug=True):
    return [(Document(d["id"], d["text"]), AUG if aug and i == 0 else Augmentation()) for i, d in enumerate(DOCS[:n])]


class RefLoRA(nn.Module):
    """PEFT's LoRA layer, plainly: ``base(x) + own * scale * (x @ A.T) @ B.T``, plus frozen companions
    ``w * scale * (x @ A_c.T) @ B_c.T`` (composed training)."""

    def __init__(self, base, a, b, scale, own=1.0, frozen=()):
        super().__init__()
        dt = next(base.parameters()).dtype
        self.base, self.a, self.b, self.scale = base, nn.Parameter(a.to(dt)), nn.Parameter(b.to(dt)), scale
        self.own, self.frozen = own, [(ca.to(dt), cb.to(dt), w) for ca, cb, w in frozen]

    def forward(self, x):
        out = self.base(x) + self.own * self.scale * (x @ self.a.T) @ self.b.T
        for ca, cb, w in self.frozen:
            out = out + w * self.scale * (x @ ca.T) @ cb.T
        return out


def reference_train(base, eid, insts, cfg, own=1.0, companions=()):
    """One expert, the whole model run on every instance (no cached residuals), torch.optim.AdamW. A
    distillation instance's teacher is the frozen model run whole on the teacher's ids; the loss is
    KL(teacher || student) per target token (F.kl_div), plus ``hidden_weight`` times the final hidden
    states' relative L1 distance, averaged over the instance's targets."""
    teacher = copy.deepcopy(base.model)
    model = copy.deepcopy(base.model)
    site = ExpertSite(model)
    init = site.init_expert(cfg.lora, torch.Generator().manual_seed(expert_seed(cfg.seed, eid)))
    layers = {}
    for n, (mlp, p) in site._slots.items():
        layers[n] = RefLoRA(getattr(mlp, p), init[f"{n}.lora_a"], init[f"{n}.lora_b"], cfg.lora.scale, own,
                            [(c[f"{n}.lora_a"], c[f"{n}.lora_b"], w) for c, w in companions])
        setattr(mlp, p, layers[n])
    params = [p for l in layers.values() for p in (l.a, l.b)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.epochs):
        for inst in insts:
            ids = torch.tensor(inst.ids)
            out = model(ids[None], output_hidden_states=True)
            logits = out.logits[0, inst.loss_start:-1]
            if inst.teacher is None:
                loss = F.cross_entropy(logits, ids[inst.loss_start + 1:])
            else:
                with torch.no_grad():
                    t = teacher(torch.tensor([inst.teacher]), output_hidden_states=True)
                n = inst.targets
                t_logits = t.logits[0, inst.teacher_start:inst.teacher_start + n]
                loss = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                                reduction="batchmean")
                if cfg.hidden_weight:
                    h, ht = out.hidden_states[-1][0, inst.loss_start:-1], t.hidden_states[-1][0, inst.teacher_start:][:n]
                    loss = loss + cfg.hidden_weight * ((h - ht).abs().sum(-1) / ht.abs().sum(-1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {**{f"{n}.lora_a": l.a.detach() for n, l in layers.items()},
            **{f"{n}.lora_b": l.b.detach() for n, l in layers.items()}}


CFG = Recipe(lora=LoRAConfig(4, 16.0), lr=2e-3, epochs=3)
DISTILL = Recipe(lora=LoRAConfig(4, 16.0), objective="distill", augment="model", lr=2e-3, epochs=3,
                 instances=("chunks", "subject", "questions", "rewrites"), answer_tokens=6)


@pytest.fixture
def base64(base):
    """The base in float64: batched training and the reference agree to rounding, not to Adam's
    amplification of float32 noise in near-zero gradients."""
    return load_base(copy.deepcopy(base.model).double(), tokenizer=base.tokenizer)


def test_equals_peft_style_reference(base64):
    base = base64
    (doc, aug), = docs(1)
    got = train_experts(base, [(doc, aug)], CFG)[0].tensors
    ref = reference_train(base, doc.id, training_instances(base.tokenizer, doc.text, aug, CFG.max_length), CFG)
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-7, rtol=1e-6, msg=k)
    assert any(got[k].abs().max() > 1e-3 for k in got if k.endswith("lora_b"))  # it did train


def _random_expert(base, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.05
            for k, v in base.site.init_expert(cfg.lora, torch.Generator().manual_seed(0)).items()}


def _companions(experts, sets, own):
    from doe_ext.dmoe.experts import ExpertSet
    from doe_ext.dmoe.train import Companions

    names = {k.rsplit(".", 1)[0] for k in experts[0]}
    stack = ExpertSet({n: torch.stack([e[f"{n}.lora_a"] for e in experts]) for n in names},
                      {n: torch.stack([e[f"{n}.lora_b"] for e in experts]) for n in names})
    return Companions(stack, sets, own)


def test_composed_training_equals_the_reference(base64):
    """An expert trained beside frozen companions (composed training, issue 45 item 4) equals the
    PEFT-style loop with the companions' LoRA terms added to the same projections; trained together
    with an expert alone, each equals its own run; a companion of weight 0 changes nothing."""
    base = base64
    items = docs(2)
    c1, c2 = _random_expert(base, CFG, 1), _random_expert(base, CFG, 2)
    comp = _companions([c1, c2], [[(0, 0.3), (1, 0.2)], []], [0.5, 1.0])
    got = train_experts(base, items, CFG, companions=comp)
    (doc, aug) = items[0]
    ref = reference_train(base, doc.id, training_instances(base.tokenizer, doc.text, aug, CFG.max_length), CFG,
                          own=0.5, companions=[(c1, 0.3), (c2, 0.2)])
    for k in ref:
        torch.testing.assert_close(got[0].tensors[k], ref[k], atol=1e-7, rtol=1e-6, msg=k)
    alone = train_experts(base, items[1:], CFG)[0]
    for k in alone.tensors:
        torch.testing.assert_close(got[1].tensors[k], alone.tensors[k], atol=1e-7, rtol=1e-6, msg=k)
    plain = train_experts(base, items[:1], CFG)[0]
    assert any(not torch.allclose(got[0].tensors[k], plain.tensors[k]) for k in plain.tensors)
    zero = train_experts(base, items[:1], CFG, companions=_companions([c1], [[(0, 0.0)]], [1.0]))[0]
    for k in plain.tensors:
        torch.testing.assert_close(zero.tensors[k], plain.tensors[k], atol=1e-7, rtol=1e-6, msg=k)
    with pytest.raises(ValueError, match="`companions` has sets for 2 experts, not 1"):
        train_experts(base, items[:1], CFG, companions=comp)


@pytest.mark.parametrize("objective", ["next_token", "distill"])
def test_together_equals_one_at_a_time(base64, objective):
    base = base64
    recipe = {"next_token": CFG, "distill": DISTILL}[objective]
    items = docs(4 if objective == "next_token" else 3)
    together = train_experts(base, items, recipe)
    for item, t in zip(items, together):
        alone = train_experts(base, [item], recipe)[0]
        assert t.id == alone.id == item[0].id
        for k in alone.tensors:
            torch.testing.assert_close(t.tensors[k], alone.tensors[k], atol=1e-7, rtol=1e-6)
        assert t.loss == pytest.approx(alone.loss, rel=1e-5)


def test_loss_falls_with_epochs(base):
    item = docs(1)[:1]
    one = train_experts(base, item, Recipe(lr=1e-2, epochs=1))[0].loss
    five = train_experts(base, item, Recipe(lr=1e-2, epochs=5))[0].loss
    assert five < one


def test_epoch_snapshots_equal_shorter_runs(base):
    """The constant learning rate makes epoch e of a long run the experts of an e-epoch run."""
    items = docs(3)
    seen = {}
    final = train_experts(base, items, CFG, on_epoch=lambda e, experts: seen.setdefault(e, experts))
    assert sorted(seen) == [1, 2, 3] and seen[3] is final
    for e in (1, 2):
        short = train_experts(base, items, CFG.replace(epochs=e))
        for got, ref in zip(seen[e], short):
            for k in ref.tensors:
                torch.testing.assert_close(got.tensors[k], ref.tensors[k], atol=1e-6, rtol=1e-6)
            assert got.loss == pytest.approx(ref.loss, rel=1e-6)


def test_on_step_counts_every_optimizer_step(base):
    """The build's progress hook: (done, total) after each step, done rising by one up to total."""
    items = docs(3)
    seen = []
    train_experts(base, items, CFG, on_step=lambda done, total: seen.append((done, total)))
    total = seen[0][1]
    assert seen == [(i + 1, total) for i in range(total)] and total % CFG.epochs == 0


def test_the_build_bar_moves_within_a_group(base, tmp_path, capsys, monkeypatch):
    """One group of 3 experts: the bar shows fractions of the group while it trains, and its phases
    (every refresh shown: tiny experts train faster than tqdm's default 0.1 s between refreshes)."""
    import functools

    from tqdm.auto import tqdm

    import doe_ext.dmoe.build as build_module
    from doe_ext.dmoe import ExpertBank, build_bank

    monkeypatch.setattr(build_module, "tqdm", functools.partial(tqdm, mininterval=0))
    bank = ExpertBank(tmp_path / "b", create=True, fingerprint=base.fingerprint, base_name="t", recipe=CFG)
    build_bank(base, [d for d, _ in docs(3)], bank, progress=True)
    err = capsys.readouterr().err
    fractions = {float(m) for m in re.findall(r"\| (\d+\.\d)/3 ", err)}
    assert {0.0, 3.0} < fractions and any(0 < f < 3 for f in fractions), sorted(fractions)
    assert "augmenting" in err and "training" in err


def test_instances_follow_prag(base):
    tok = base.tokenizer
    insts = training_instances(tok, DOCS[0]["text"], AUG, 512)
    assert len(insts) == 2 + 2 * 2 + 1  # passage, rewrite; QA 0-1 with each; QA 2 alone
    assert tok.decode(insts[0].ids) == DOCS[0]["text"] and insts[0].loss_start == 0
    for inst, qa in zip(insts[2:], [0, 0, 1, 1, 2]):
        target = tok.decode(inst.ids[inst.loss_start + 1:])
        assert target == " " + AUG.qa[qa]["answer"] + tok.eos_token
    assert DOCS[0]["text"] in tok.decode(insts[2].ids) and AUG.rewrite in tok.decode(insts[3].ids)
    assert "Passage" not in tok.decode(insts[6].ids)


def test_prefix_groups():
    insts = [Instance([1, 2, 3, 4, 5, 6], 2), Instance([9, 9], 0), Instance([1, 2, 3, 7, 8], 3),
             Instance([1, 2, 3, 4, 0], 1), Instance([1, 2], 0)]
    groups, rest = _prefix_groups(insts, min_shared=3)
    assert groups == [(3, [3, 0, 2])] and sorted(rest) == [1, 4]  # [1, 2] shares only 2
    groups, _ = _prefix_groups(insts[:1] + insts[3:4], min_shared=3)
    assert groups == [(4, [1, 0])]
    assert _prefix_groups([Instance([5, 5], 0), Instance([5, 5], 0)], 1)[0] == [(1, [0, 1])]  # a suffix stays


def test_shared_prefixes_give_the_same_residuals(base):
    """The PRAG instances that repeat the instruction and the passage run that prefix once."""
    insts = training_instances(base.tokenizer, DOCS[0]["text"], AUG, 512)
    groups, _ = _prefix_groups(insts, 16)
    assert groups and max(len(m) for _, m in groups) >= 2
    shared, alone = residuals(base, insts), residuals(base, insts, min_shared=10 ** 6)
    small = residuals(base, insts, max_batch_tokens=1)  # a group's suffixes in batches of one
    for (x, t), (y, u), (z, v) in zip(shared, alone, small):
        assert torch.equal(t, u) and torch.equal(t, v)
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x, z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 100])
@pytest.mark.parametrize("objective", ["next_token", "distill"])
def test_chunked_loss(chunk, objective):
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(11, 5, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    w = torch.rand(7, dtype=torch.float64)
    if objective == "next_token":
        target = torch.randint(0, 11, (7,))
        ref_rows = F.cross_entropy(F.linear(hidden, weight, bias), target, reduction="none")
    else:  # the teacher's hidden states, through the same head
        target = torch.randn(7, 5, dtype=torch.float64)
        ref_rows = F.kl_div(F.log_softmax(F.linear(hidden, weight, bias), -1),
                            F.log_softmax(F.linear(target, weight, bias), -1), log_target=True,
                            reduction="none").sum(-1)
    total, rows = chunked_loss(hidden, weight, bias, target, w, chunk)
    torch.testing.assert_close(rows, ref_rows.detach())
    torch.testing.assert_close(total, (ref_rows * w).sum())
    (g,) = torch.autograd.grad(2.5 * total, hidden)
    (ref_g,) = torch.autograd.grad(2.5 * (ref_rows * w).sum(), hidden)
    torch.testing.assert_close(g, ref_g)


def test_bad_config_and_empty_document(base):
    with pytest.raises(ValueError, match="`rank` must be a positive int"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="document 'x' gives no training tokens"):
        train_experts(base, [(Document("x", "a"), Augmentation())], CFG)


def test_distill_kl_is_zero_at_the_teacher():
    """KL(teacher || student) is 0 where the student's hidden state is the teacher's, and so is its gradient."""
    h = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 5, dtype=torch.float64)
    total, rows = chunked_loss(h, weight, None, h.detach().clone(), torch.ones(4, dtype=torch.float64), 2)
    (g,) = torch.autograd.grad(total, h)
    assert rows.abs().max() < 1e-12 and g.abs().max() < 1e-12
    assert hidden_l1(h.detach(), h.detach()).abs().max() == 0


def test_distill_instances(base):
    """The teacher's sequence holds the document (or the sentences before the target); the student's
    never does; both end in the same target tokens."""
    (doc, aug), = docs(1)
    tok = base.tokenizer
    insts = distill_instances(base, [(doc, aug)], DISTILL)[0]
    n_prompts = len(SUBJECT_PROMPTS) + len(AUG.qa)
    n_chunks = len(sentences(doc.text)) - 1
    assert n_chunks == 0 and 0 < len(insts) <= n_prompts + 1  # one sentence; answers may be empty
    for inst in insts:
        n = inst.targets
        assert n >= 1 and inst.teacher[-n:] == inst.ids[-n:]
        assert inst.teacher_start == len(inst.teacher) - 1 - n
        student, teacher = tok.decode(inst.ids[:inst.loss_start + 1]), tok.decode(inst.teacher[:inst.teacher_start + 1])
        assert doc.text not in student and (doc.text in teacher or "Passage" in teacher)
    asked = [tok.decode(i.ids[:i.loss_start + 1]) for i in insts]
    assert any(SUBJECT_PROMPTS[0].format(s=doc.id) in a for a in asked)
    two = Document("two", "Basalt is dark. It forms from lava. Iron makes it heavy.", title="basalt")
    chunks = distill_instances(base, [(two, Augmentation())], Recipe(objective="distill", instances=("chunks",)))[0]
    assert [tok.decode(i.ids[i.loss_start + 1:]) for i in chunks] == [" It forms from lava.", " Iron makes it heavy."]
    assert tok.decode(chunks[1].teacher).startswith("basalt: Basalt is dark. It forms from lava.")
    shuffled = distill_instances(base, [(two, Augmentation())], Recipe(objective="distill", instances=("shuffled",)))[0]
    targets = [tok.decode(i.ids[i.loss_start + 1:]) for i in shuffled]
    assert len(targets) == SHUFFLES and len(set(targets)) > 1  # seeded orders of the same three sentences
    assert all(sorted(sentences(t)) == sorted(sentences(two.text)) for t in targets)
    assert all(tok.decode(i.teacher).startswith(f"Passage: {two.text}\nbasalt:") for i in shuffled)
    again = distill_instances(base, [(two, Augmentation())], Recipe(objective="distill", instances=("shuffled",)))[0]
    assert [i.ids for i in again] == [i.ids for i in shuffled]


def test_distill_keeps_a_document_longer_than_max_length(base):
    """``max_length`` bounds the student's sequence: a document longer than it (with the
    demonstrations, in the teacher's prompt) still gives instances, the teacher seeing all of it."""
    tok = base.tokenizer
    long = Document("long", " ".join(f"Fact {i}: the basalt sample {i} weighs {3 * i} grams." for i in range(12)),
                    title="basalt samples")
    recipe = Recipe(objective="distill", instances=("subject",), answer_tokens=4, max_length=200)
    assert len(tok(long.text)["input_ids"]) > recipe.max_length
    insts = distill_instances(base, [(long, Augmentation())], recipe)[0]
    assert insts and all(len(i.ids) <= recipe.max_length < len(i.teacher) for i in insts)
    assert all(long.text in tok.decode(i.teacher) for i in insts)


@pytest.mark.parametrize("hidden_weight", [0.0, 0.5])
def test_distill_equals_the_slow_reference(base64, hidden_weight):
    """Batched, cached context distillation == one expert at a time, the teacher and the student run whole."""
    base = base64
    recipe = DISTILL.replace(hidden_weight=hidden_weight)
    (doc, aug), = docs(1)
    got = train_experts(base, [(doc, aug)], recipe)[0].tensors
    insts = distill_instances(base, [(doc, aug)], recipe)[0]
    ref = reference_train(base, doc.id, insts, recipe)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-7, rtol=1e-6, msg=k)
    assert any(got[k].abs().max() > 1e-3 for k in got if k.endswith("lora_b"))


def test_sequence_distillation_is_cross_entropy_on_the_teachers_tokens(base64):
    """``distill_loss="sequence"``: the teacher's greedy answers as labels, nothing of its distribution."""
    (doc, aug), = docs(1)
    recipe = DISTILL.replace(distill_loss="sequence")
    insts = distill_instances(base64, [(doc, aug)], recipe)[0]
    got = train_experts(base64, [(doc, aug)], recipe, instances=[insts])[0].tensors
    hard = [Instance(i.ids, i.loss_start) for i in insts]  # the teacher's tokens are the student's targets
    ref = reference_train(base64, doc.id, hard, CFG.replace(lr=recipe.lr, epochs=recipe.epochs))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-7, rtol=1e-6, msg=k)
    soft = train_experts(base64, [(doc, aug)], DISTILL, instances=[insts])[0].tensors
    assert any(not torch.allclose(soft[k], got[k]) for k in got)  # KL is another objective
