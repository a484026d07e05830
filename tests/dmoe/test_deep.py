"""Table 3's deep experts (the last 25% / 50% of the layers) against plain references."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dmoe_testing import DOCS, QUESTIONS, random_bank
from doe_ext.dmoe import Augmentation, DMoE, Document, ExpertBank, ExpertSite, LoRAConfig, Recipe, train_experts
from doe_ext.dmoe.deep import train_deep
from doe_ext.dmoe.distill import instances_for
from doe_ext.dmoe.experts import set_linear_weight
from doe_ext.dmoe.model import token_entropy
from doe_ext.dmoe.instances import training_instances
from doe_ext.dmoe.train import expert_seed
from test_train import AUG, RefLoRA, base64  # noqa: F401  (a fixture)

CFG = Recipe(lora=LoRAConfig(4, 16.0), lr=2e-3, epochs=3)


def items(n):
    return [(Document(d["id"], d["text"]), AUG if i == 0 else Augmentation()) for i, d in enumerate(DOCS[:n])]


def test_last_layer_only_equals_dmoe_training(base64):
    site = ExpertSite(base64.model, depth=1)
    assert site.keeps_cache and site.names == base64.site.names
    got = train_deep(base64, site, items(3), CFG)
    ref = train_experts(base64, items(3), CFG)
    for g, r in zip(got, ref):
        for k, v in r.tensors.items():
            torch.testing.assert_close(g.tensors[k], v, atol=1e-7, rtol=1e-6)
        assert g.loss == pytest.approx(r.loss, rel=1e-6)
    site.detach()


def test_every_layer_equals_a_reference_loop(base64):
    """Both layers' MLPs: PEFT-style LoRA modules, the whole model on each instance, torch.optim.AdamW."""
    base = base64
    site = ExpertSite(base.model, depth=1.0)
    (doc, aug), = items(1)
    got = train_deep(base, site, [(doc, aug)], CFG)[0].tensors
    site.detach()
    model = copy.deepcopy(base.model)
    ref_site = ExpertSite(model, depth=1.0)
    init = ref_site.init_expert(CFG.lora, torch.Generator().manual_seed(expert_seed(CFG.seed, doc.id)))
    layers = {}
    for n, (m, p) in ref_site._slots.items():
        layers[n] = RefLoRA(getattr(m, p), init[f"{n}.lora_a"], init[f"{n}.lora_b"], CFG.lora.scale)
        setattr(m, p, layers[n])
    opt = torch.optim.AdamW([q for lyr in layers.values() for q in (lyr.a, lyr.b)], lr=CFG.lr,
                            weight_decay=CFG.weight_decay)
    for _ in range(CFG.epochs):
        for inst in training_instances(base.tokenizer, doc.text, aug, CFG.max_length):
            ids = torch.tensor(inst.ids)
            loss = F.cross_entropy(model(ids[None]).logits[0][inst.loss_start:-1], ids[inst.loss_start + 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert set(got) == {f"{n}.lora_{x}" for n in layers for x in "ab"}
    for n, lyr in layers.items():
        torch.testing.assert_close(got[f"{n}.lora_a"], lyr.a.detach(), atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(got[f"{n}.lora_b"], lyr.b.detach(), atol=1e-7, rtol=1e-6)
    assert any(got[k].abs().max() > 1e-3 for k in got if k.endswith("lora_b"))


def test_sequence_distillation_at_the_last_layer_equals_dmoe_training(base64):
    """The default recipe's objective (the teacher's answers as next-token targets) through the whole
    model, at the last layer: the experts the cached-residual path trains on the same instances."""
    recipe = Recipe(objective="distill", distill_loss="sequence", instances=("subject",), answer_tokens=4, lr=2e-3,
                    epochs=2)
    insts = instances_for(base64, items(2), recipe)
    assert all(i.teacher is not None for doc in insts for i in doc)
    site = ExpertSite(base64.model, depth=1)
    got = train_deep(base64, site, items(2), recipe, instances=insts)
    site.detach()
    ref = train_experts(base64, items(2), recipe, instances=insts)
    for g, r in zip(got, ref):
        for k, v in r.tensors.items():
            torch.testing.assert_close(g.tensors[k], v, atol=1e-7, rtol=1e-6)


def test_deep_training_refuses_the_kl_distillation(base):
    with pytest.raises(ValueError, match="deep experts train on next-token targets .*got distill_loss='kl'"):
        train_deep(base, ExpertSite(base.model, 1.0), items(1),
                   Recipe(objective="distill", distill_loss="kl", instances=("subject",)))


def deep_bank(base, site, path, seed=0, zero_below=False):
    """Random experts on every layer of ``site`` (with ``zero_below``: B = 0 below the last layer)."""
    bank = ExpertBank(path, create=True, fingerprint=base.fingerprint, base_name=base.name, recipe=CFG)
    gen = torch.Generator().manual_seed(seed)
    last = site.layer_ids[-1]
    for d in DOCS:
        t = {}
        for n, (o, i) in site.shapes().items():
            t[f"{n}.lora_a"] = torch.randn(4, i, generator=gen) * 0.5
            t[f"{n}.lora_b"] = torch.randn(o, 4, generator=gen) * 0.5 * (not zero_below or n.startswith(f"{last}."))
        bank.add(d["id"], t, d["text"], d["text"])
    return bank


def reference(base, bank, depth, prompt, n, tau, k):
    """No cache: the whole sequence with the active experts merged into every expert layer, every step."""
    model = copy.deepcopy(base.model)
    site = ExpertSite(model, depth=depth)
    plain = {name: w.detach().clone() for name, w in site.weights().items()}
    tok = base.tokenizer

    def logits(ids, active):
        for name, m in site.modules().items():
            delta = [bank.lora.scale * bank.get(e)[f"{name}.lora_b"] @ bank.get(e)[f"{name}.lora_a"] for e in active]
            set_linear_weight(m, plain[name] + sum(delta) if delta else plain[name])
        return model(torch.tensor([ids])).logits[0, -1]

    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    active, tokens, triggers = [], [], []
    with torch.no_grad():
        for t in range(n):
            lg = logits(ids, active)
            if token_entropy(lg).item() > tau:
                active = bank.route(tok.decode(ids[-128:]), k)
                triggers.append((t, active))
                lg = logits(ids, active)
            tokens.append(int(lg.argmax()))
            ids.append(tokens[-1])
            if tokens[-1] == tok.eos_token_id:
                break
    return tokens, triggers


@pytest.mark.parametrize("tau", [0.0, 3.5, math.inf])
def test_generate_equals_no_cache_reference(base, tmp_path, tau):
    """DMoE with a deep site (a trigger re-runs the rows and replaces their cache), in a batch, equals
    the reference one prompt at a time."""
    site = ExpertSite(base.model, depth=1.0)
    bank = deep_bank(base, site, tmp_path / "deep")
    dm = DMoE(base, bank, tau=tau, top_k=2, site=site, compose="sum")  # the reference sums
    got = dm.generate(QUESTIONS[:3], 8)
    for q, g in zip(QUESTIONS[:3], got):
        tokens, triggers = reference(base, bank, 1.0, q, 8, tau, 2)
        assert g.tokens == tokens
        assert [(t.position, t.experts) for t in g.triggers] == triggers
    assert (dm.recomputed_tokens > 0) == (tau != math.inf)
    site.detach()


def test_zero_deeper_experts_generate_as_dmoe(base, tmp_path):
    """Experts whose deeper layers are zero: re-running the rows with a fresh cache changes nothing,
    so the deep site agrees with DMoE's re-prediction from the residual."""
    flat = random_bank(base, tmp_path / "flat")
    site = ExpertSite(base.model, depth=1.0)
    bank = ExpertBank(tmp_path / "deep", create=True, fingerprint=base.fingerprint, base_name=base.name, recipe=CFG)
    for d in DOCS:
        t = {f"1.{k}": v for k, v in flat.get(d["id"]).items()}
        t.update({f"0.{k}": v * (k.endswith("lora_a")) for k, v in flat.get(d["id"]).items()})
        bank.add(d["id"], t, d["text"], d["text"])
    want = DMoE(base, flat, tau=0.0, top_k=2).generate(QUESTIONS, 6)
    deep = DMoE(base, bank, tau=0.0, top_k=2, site=site)
    got = deep.generate(QUESTIONS, 6)
    for w, g in zip(want, got):
        assert w.tokens == g.tokens and [t.experts for t in w.triggers] == [t.experts for t in g.triggers]
    assert deep.recomputed_tokens > 0
    site.detach()
