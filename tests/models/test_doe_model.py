"""DoEForCausalLM: every variant trains, the loss is the composite of its parts, the KV cache is
exact, the model round-trips through AutoModelForCausalLM, bad config values name the field."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from doe_ext.models import DoEConfig, DoEForCausalLM

V, K = 61, 6


def tiny(**overrides) -> DoEConfig:
    cfg = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=48, num_topics=K, topic_dim=8, latent_dim=5, max_position_embeddings=64,
               block_ffn_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return DoEConfig(**cfg)


def batch(B=2, T=9):
    ids = torch.randint(3, V, (B, T))
    topics = torch.randint(-1, K, (B, T))
    return ids, topics


VARIANTS = {
    "doe": {},
    "dense-base": {"knowledge": False},
    "dense-topic-input": {"knowledge": False, "topic_input": True},
    "doe-no-topic-input": {"topic_input": False},
    "supervise-last": {"supervise_last_router": True},
    "vae-softmax": {"router": "vae_softmax"},
    "no-router": {"router": "none"},
    "moe-topk": {"router": "moe_topk", "num_experts": 4, "num_experts_per_tok": 2},
    "signal-k": {"signal_source": "k"},
    "signal-q": {"signal_source": "q"},
    "signal-none": {"signal_source": "none"},
    "concat": {"fusion": "concat"},
    "block-ffn": {"blocks": "ffn"},
    "beta-decoder": {"beta": 0.1, "router_decoder": True},
    "two-layers": {"num_hidden_layers": 2},
    "one-layer": {"num_hidden_layers": 1},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_trains(variant):
    model = DoEForCausalLM(tiny(**VARIANTS[variant]))
    ids, topics = batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        out = model(ids, topic_ids=topics, labels=ids)
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0], losses
    assert out.logits.shape == (2, 9, V)


def test_loss_is_the_composite_of_its_parts():
    cfg = tiny(alpha=0.3, beta=0.2)
    model = DoEForCausalLM(cfg)
    ids, topics = batch()
    out = model(ids, topic_ids=topics, labels=ids)
    ntp = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.aux["ntp"], ntp)
    expected = (1 - 0.3) * out.aux["ntp"] + 0.3 * out.aux["expert"] + 0.2 * out.aux["kl"]
    torch.testing.assert_close(out.loss.detach(), expected)
    assert len(out.aux["layers"]) == cfg.num_hidden_layers
    for stats in out.aux["layers"]:
        assert 0 <= stats["sparsity"] <= 1 and 0 <= stats["zero_rows"] <= 1 and stats["block_cv"] >= 0


def test_expert_labels_may_be_document_distributions():
    model = DoEForCausalLM(tiny())
    ids, topics = batch()
    theta = torch.softmax(torch.randn(2, K), -1)
    out = model(ids, topic_ids=topics, labels=ids, expert_labels=theta)
    assert out.aux["expert"] > 0
    out.loss.backward()
    assert model.model.knowledge.routers["first"].parameters().__next__().grad is not None


@pytest.mark.parametrize("supervise_last", [False, True])
def test_expert_loss_averages_the_supervised_routers(supervise_last):
    """L_expert against one F.cross_entropy per router, on logits caught by hooks (the last router
    is excluded unless ``supervise_last_router``)."""
    model = DoEForCausalLM(tiny(supervise_last_router=supervise_last))
    ids, topics = batch()
    caught = []
    hooks = [r.register_forward_hook(lambda m, i, o: caught.append(o[1])) for r in model.model.knowledge.routers.values()]
    out = model(ids, topic_ids=topics, labels=ids)
    for h in hooks:
        h.remove()
    # the shared middle router runs once per middle layer: layers 0, 1 (middle), 2 (last) in order
    assert len(caught) == 3
    per_router = [F.cross_entropy(lg[:, :-1].reshape(-1, K), topics[:, 1:].reshape(-1), ignore_index=-1)
                  for lg in (caught if supervise_last else caught[:-1])]
    torch.testing.assert_close(out.aux["expert"], torch.stack(per_router).mean())


def test_a_dense_model_may_read_the_topic_embedding():
    """The control of Fig. 3: no knowledge path, no router, but the same topic input as DoE."""
    torch.manual_seed(0)
    model = DoEForCausalLM(tiny(knowledge=False, topic_input=True)).eval()
    assert model.model.knowledge is None
    plain = DoEForCausalLM(tiny(knowledge=False))
    assert {n for n, _ in model.named_parameters()} - {n for n, _ in plain.named_parameters()} == {
        "model.embed_tokens.topic_weight", "model.embed_tokens.token_weight", "model.embed_tokens.proj.weight"}
    ids, topics = batch()
    other = torch.where(topics >= 0, (topics + 1) % K, topics)
    assert not torch.allclose(model(ids, topic_ids=topics).logits, model(ids, topic_ids=other).logits)
    # unlabeled topics (-1) contribute nothing: equal to the embedding's token part alone
    emb = model.model.embed_tokens
    x = emb(ids, torch.full_like(ids, -1))
    torch.testing.assert_close(x, F.embedding(ids, emb.token_weight) @ emb.proj.weight[:, :32].T)
    gen = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 7)


@pytest.mark.parametrize("signal", ["v", "k", "q"])
def test_greedy_generate_with_cache_equals_without(signal):
    model = DoEForCausalLM(tiny(signal_source=signal)).eval()
    ids, topics = batch(B=2, T=5)
    kw = dict(max_new_tokens=6, do_sample=False, topic_ids=topics, pad_token_id=0)
    with_cache = model.generate(ids, use_cache=True, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert with_cache.shape == (2, 11)
    torch.testing.assert_close(with_cache, without)


def test_generated_tokens_take_the_predicted_topic():
    model = DoEForCausalLM(tiny()).eval()
    ids, topics = batch(B=1, T=4)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["topic_ids"].clone(), None)), with_kwargs=True)
    outs = []
    model.register_forward_hook(lambda m, a, kw, out: outs.append(out.next_topic_ids.clone()), with_kwargs=True)
    model.generate(ids, topic_ids=topics, max_new_tokens=3, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(seen[0][0], topics)  # the prompt's topics come from the caller
    for step in range(1, len(seen)):  # each new token's topic = the last router's argmax one step before
        assert seen[step][0][:, -1].item() == outs[step - 1][:, -1].item()


def test_save_and_load_through_auto_classes(tmp_path):
    model = DoEForCausalLM(tiny()).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is DoEForCausalLM
    ids, topics = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, topic_ids=topics).logits, model(ids, topic_ids=topics).logits)


@pytest.mark.parametrize("field,value,match", [
    ("router", "topk", r"DoEConfig.router='topk'"),
    ("signal_source", "x", r"DoEConfig.signal_source='x'"),
    ("fusion", "mul", r"DoEConfig.fusion='mul'"),
    ("blocks", "experts", r"DoEConfig.blocks='experts'"),
    ("alpha", 1.5, r"DoEConfig.alpha=1.5"),
    ("num_topics", 0, r"DoEConfig.num_topics=0"),
    ("num_experts_per_tok", 9, r"DoEConfig.num_experts_per_tok=9"),
])
def test_bad_config_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny(**{field: value})


def test_zero_gate_block_gets_exactly_zero_gradient():
    model = DoEForCausalLM(tiny(blocks="ffn"))
    dead = 3
    for router in model.model.knowledge.routers.values():  # block `dead` can never open
        with torch.no_grad():
            router.gate.bias[dead] = -1e4
    ids, topics = batch()
    out = model(ids, topic_ids=topics, labels=ids)
    out.loss.backward()
    for layer in model.model.layers:
        ffn = layer.ffn
        assert torch.count_nonzero(ffn.block_up.grad[dead]) == 0
        assert torch.count_nonzero(ffn.block_down.grad[dead]) == 0
        assert torch.count_nonzero(ffn.block_up.grad) > 0  # the open blocks do learn
    total, active = model.num_parameters_active(out.aux)
    assert active < total
    assert model.num_parameters_active() == (total, total)  # without a batch, every block counts
