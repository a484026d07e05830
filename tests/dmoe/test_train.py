"""Batched expert training against one-at-a-time training and a PEFT-style reference loop."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DOCS
from doe_ext.dmoe import Augmentation, LoRAConfig, TrainConfig, train_experts
from doe_ext.dmoe.base import LastLayer
from doe_ext.dmoe.experts import init_expert
from doe_ext.dmoe.train import Instance, _prefix_groups, chunked_lm_loss, expert_seed, residuals, training_instances

AUG = Augmentation(kind="model", rewrite="A sea otter lies on its back and breaks shellfish with a stone.",
                   qa=[{"question": "What does the otter float on?", "answer": "its back", "full_answer": "its back"},
                       {"question": "What does it crack?", "answer": "shellfish", "full_answer": "shellfish"},
                       {"question": "Where is the stone?", "answer": "on its chest", "full_answer": "on its chest"}])


def docs(n, aug=True):
    return [(d["id"], d["text"], AUG if aug and i == 0 else Augmentation()) for i, d in enumerate(DOCS[:n])]


class RefLoRA(nn.Module):
    """PEFT's LoRA layer, plainly: ``base(x) + scale * (x @ A.T) @ B.T``."""

    def __init__(self, base, a, b, scale):
        super().__init__()
        self.base, self.a, self.b, self.scale = base, nn.Parameter(a.clone()), nn.Parameter(b.clone()), scale

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.a.T) @ self.b.T


def reference_train(base, eid, text, aug, cfg):
    """One expert, the whole model run on every instance (no cached residuals), torch.optim.AdamW."""
    model = copy.deepcopy(base.model)
    last = LastLayer(model)
    init = init_expert(last.shapes(), cfg.lora, torch.Generator().manual_seed(expert_seed(cfg.seed, eid)))
    layers = {}
    for n, m in last.projections().items():
        layers[n] = RefLoRA(m, init[f"{n}.lora_a"], init[f"{n}.lora_b"], cfg.lora.scale)
        setattr(last.mlp, n, layers[n])
    params = [p for l in layers.values() for p in (l.a, l.b)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    insts = training_instances(base.tokenizer, text, aug, cfg.max_length)
    for _ in range(cfg.epochs):
        for inst in insts:
            ids = torch.tensor(inst.ids)
            logits = model(ids[None]).logits[0]
            loss = F.cross_entropy(logits[inst.loss_start:-1], ids[inst.loss_start + 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {**{f"{n}.lora_a": l.a.detach() for n, l in layers.items()},
            **{f"{n}.lora_b": l.b.detach() for n, l in layers.items()}}


CFG = TrainConfig(lora=LoRAConfig(4, 16.0), lr=2e-3, epochs=3)


def test_equals_peft_style_reference(base):
    (eid, text, aug), = docs(1)
    got = train_experts(base, [(eid, text, aug)], CFG)[0].tensors
    ref = reference_train(base, eid, text, aug, CFG)
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4, msg=k)
    assert any(got[k].abs().max() > 1e-3 for k in got if k.endswith("lora_b"))  # it did train


def test_together_equals_one_at_a_time(base):
    items = docs(4)
    together = train_experts(base, items, CFG)
    for item, t in zip(items, together):
        alone = train_experts(base, [item], CFG)[0]
        assert t.id == alone.id == item[0]
        for k in alone.tensors:
            torch.testing.assert_close(t.tensors[k], alone.tensors[k], atol=1e-5, rtol=1e-5)
        assert t.loss == pytest.approx(alone.loss, rel=1e-5)


def test_loss_falls_with_epochs(base):
    item = docs(1)[:1]
    one = train_experts(base, item, TrainConfig(lr=1e-2, epochs=1))[0].loss
    five = train_experts(base, item, TrainConfig(lr=1e-2, epochs=5))[0].loss
    assert five < one


def test_epoch_snapshots_equal_shorter_runs(base):
    """The constant learning rate makes epoch e of a long run the experts of an e-epoch run."""
    items = docs(3)
    seen = {}
    final = train_experts(base, items, CFG, on_epoch=lambda e, experts: seen.setdefault(e, experts))
    assert sorted(seen) == [1, 2, 3] and seen[3] is final
    for e in (1, 2):
        short = train_experts(base, items, TrainConfig(lora=CFG.lora, lr=CFG.lr, epochs=e))
        for got, ref in zip(seen[e], short):
            for k in ref.tensors:
                torch.testing.assert_close(got.tensors[k], ref.tensors[k], atol=1e-6, rtol=1e-6)
            assert got.loss == pytest.approx(ref.loss, rel=1e-6)


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
    for (x, t), (y, u) in zip(shared, alone):
        assert torch.equal(t, u)
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_lm_loss(chunk):
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(11, 5, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    target, w = torch.randint(0, 11, (7,)), torch.rand(7, dtype=torch.float64)
    total, rows = chunked_lm_loss(hidden, weight, bias, target, w, chunk)
    ref_rows = F.cross_entropy(F.linear(hidden, weight, bias), target, reduction="none")
    torch.testing.assert_close(rows, ref_rows.detach())
    torch.testing.assert_close(total, (ref_rows * w).sum())
    (g,) = torch.autograd.grad(2.5 * total, hidden)
    (ref_g,) = torch.autograd.grad(2.5 * (ref_rows * w).sum(), hidden)
    torch.testing.assert_close(g, ref_g)


def test_bad_config_and_empty_document(base):
    with pytest.raises(ValueError, match="`epochs` must be a positive int"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="`lr` must be > 0"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="`rank` must be a positive int"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="document 'x' gives no training tokens"):
        train_experts(base, [("x", "a", Augmentation())], CFG)
