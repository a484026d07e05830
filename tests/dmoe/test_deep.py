"""Table 3's deep experts (the last 25% / 50% of the layers) against plain references."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DOCS, QUESTIONS, random_bank
from doe_ext.dmoe import Augmentation, DMoE, ExpertBank, LoRAConfig, TrainConfig, train_experts
from doe_ext.dmoe.base import get_path, linear_weight, unwrap
from doe_ext.dmoe.deep import DeepDMoE, DeepLayers, train_deep
from doe_ext.dmoe.experts import init_expert
from doe_ext.dmoe.model import token_entropy
from doe_ext.dmoe.train import expert_seed, training_instances
from doe_ext.integrations.hf.adapters import adapter_for
from test_train import AUG, RefLoRA

CFG = TrainConfig(lora=LoRAConfig(4, 16.0), lr=2e-3, epochs=3)


def items(n):
    return [(d["id"], d["text"], AUG if i == 0 else Augmentation()) for i, d in enumerate(DOCS[:n])]


def test_last_layer_only_equals_dmoe_training(base):
    deep = DeepLayers(base, 0.5)  # 2 layers: the last one only
    assert deep.first == 1 and deep.recompute_fraction == 0.5
    got = train_deep(deep, items(3), CFG)
    ref = train_experts(base, items(3), CFG)
    for g, r in zip(got, ref):
        for k, v in r.tensors.items():
            torch.testing.assert_close(g.tensors[f"1.{k}"], v, atol=1e-5, rtol=1e-4)
        assert g.loss == pytest.approx(r.loss, rel=1e-4)
    deep.detach()


def _modules(model, first):
    mt, adapter = model.config.model_type, adapter_for(model)
    layers = get_path(model, adapter.layers)
    from doe_ext.dmoe.base import SPECS
    return {f"{i}.{p}": (get_path(layers[i], adapter.mlp), p) for i in range(first, len(layers))
            for p in SPECS[mt].projections}


def test_every_layer_equals_a_reference_loop(base):
    """Both layers' MLPs: PEFT-style LoRA modules, the whole model on each instance, torch.optim.AdamW."""
    deep = DeepLayers(base, 1.0)
    (eid, text, aug), = items(1)
    got = train_deep(deep, [(eid, text, aug)], CFG)[0].tensors
    deep.detach()
    model = copy.deepcopy(base.model)
    mods = _modules(model, 0)
    shapes = {n: tuple(linear_weight(getattr(m, p)).shape) for n, (m, p) in mods.items()}
    init = init_expert(shapes, CFG.lora, torch.Generator().manual_seed(expert_seed(CFG.seed, eid)))
    layers = {}
    for n, (m, p) in mods.items():
        layers[n] = RefLoRA(getattr(m, p), init[f"{n}.lora_a"], init[f"{n}.lora_b"], CFG.lora.scale)
        setattr(m, p, layers[n])
    opt = torch.optim.AdamW([q for lyr in layers.values() for q in (lyr.a, lyr.b)], lr=CFG.lr,
                            weight_decay=CFG.weight_decay)
    for _ in range(CFG.epochs):
        for inst in training_instances(base.tokenizer, text, aug, CFG.max_length):
            ids = torch.tensor(inst.ids)
            loss = F.cross_entropy(model(ids[None]).logits[0][inst.loss_start:-1], ids[inst.loss_start + 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for n, lyr in layers.items():
        torch.testing.assert_close(got[f"{n}.lora_a"], lyr.a.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[f"{n}.lora_b"], lyr.b.detach(), atol=1e-5, rtol=1e-4)
    assert any(got[k].abs().max() > 1e-3 for k in got if k.endswith("lora_b"))


def deep_bank(base, deep, path, seed=0):
    bank = ExpertBank(path, create=True, fingerprint=base.fingerprint, base_name=base.name, lora=LoRAConfig(4, 16.0))
    gen = torch.Generator().manual_seed(seed)
    for d in DOCS:
        t = {}
        for n, (o, i) in deep.shapes().items():
            t[f"{n}.lora_a"] = torch.randn(4, i, generator=gen) * 0.5
            t[f"{n}.lora_b"] = torch.randn(o, 4, generator=gen) * 0.5
        bank.add(d["id"], t, d["text"], d["text"])
    return bank


def reference(base, bank, deep, prompt, n, tau, k):
    """No cache: the whole sequence with the active experts merged into every expert layer, every step."""
    model = copy.deepcopy(base.model)
    mods = _modules(model, deep.first)
    plain = {name: linear_weight(unwrap(getattr(m, p))).detach().clone() for name, (m, p) in mods.items()}
    tok = base.tokenizer

    def logits(ids, active):
        for name, (m, p) in mods.items():
            w = plain[name] + sum(bank.lora.scale * bank.get(e)[f"{name}.lora_b"] @ bank.get(e)[f"{name}.lora_a"]
                                  for e in active) if active else plain[name]
            mod = unwrap(getattr(m, p))  # outside a routing call a wrapper is its base layer
            mod.weight.data.copy_(w if isinstance(mod, torch.nn.Linear) else w.t())
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
    deep = DeepLayers(base, 1.0)
    bank = deep_bank(base, deep, tmp_path / "deep")
    dm = DeepDMoE(deep, bank, tau=tau, top_k=2)
    for q in QUESTIONS[:3]:
        g = dm.generate([q], 8)[0]
        tokens, triggers = reference(base, bank, deep, q, 8, tau, 2)
        assert g.tokens == tokens
        assert [(t.position, t.experts) for t in g.triggers] == triggers
    assert (dm.recomputed_tokens > 0) == (tau != math.inf)
    deep.detach()


def test_last_layer_only_generates_as_dmoe(base, tmp_path):
    """Experts on the last layer only: rebuilding the cache changes nothing, DMoE's re-prediction agrees."""
    flat = random_bank(base, tmp_path / "flat")
    deep = DeepLayers(base, 0.5)
    bank = ExpertBank(tmp_path / "deep", create=True, fingerprint=base.fingerprint, base_name=base.name,
                      lora=LoRAConfig(4, 16.0))
    for d in DOCS:
        bank.add(d["id"], {f"1.{k}": v for k, v in flat.get(d["id"]).items()}, d["text"], d["text"])
    want = DMoE(base, flat, tau=0.0, top_k=2).generate(QUESTIONS, 6)
    got = DeepDMoE(deep, bank, tau=0.0, top_k=2).generate(QUESTIONS, 6)
    for w, g in zip(want, got):
        assert w.tokens == g.tokens and [t.experts for t in w.triggers] == [t.experts for t in g.triggers]
    deep.detach()
