"""doeify: the DoE knowledge path on pretrained HF causal LMs, table-driven over the families,
against the untouched model (tiny random configs, no downloads)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig,
                          Qwen2Config)

from reference_generation import reference_beam_search

from doe_ext.integrations.hf import DoEMLP, DoEWrapper, doeify

V, D, L, K = 97, 32, 3, 8  # three layers: a first, a shared middle and a last router
LLAMA_LIKE = dict(vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=L, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": lambda: LlamaConfig(**LLAMA_LIKE),
    "qwen2": lambda: Qwen2Config(**LLAMA_LIKE),
    "mistral": lambda: MistralConfig(**LLAMA_LIKE),
    "gpt2": lambda: GPT2Config(vocab_size=V, n_embd=D, n_layer=L, n_head=4, n_positions=64, bos_token_id=1,
                                eos_token_id=2),
}
OPTIONS = dict(num_topics=K, topic_dim=4, latent_dim=8)


def make_base(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]())
    model.generation_config.eos_token_id = None  # generate runs max_new_tokens; no early stop
    return model.eval()


def batch(seed: int = 1, B: int = 2, T: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    topics = torch.randint(-1, K, (B, T), generator=g)  # -1: unlabeled
    return ids, topics


def added_parameters(wrapper: DoEWrapper, base_params: set[int]) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in wrapper.named_parameters() if id(p) not in base_params}


def perturb_knowledge(wrapper: DoEWrapper, base_params: set[int], seed: int = 3) -> None:
    """Move every added parameter off its no-op start, so the knowledge path changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in added_parameters(wrapper, base_params).values():
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_equal_the_original_at_init(family):
    base = make_base(family)
    ref = copy.deepcopy(base)
    wrapper = doeify(base, **OPTIONS).eval()
    ids, topics = batch()
    assert sum(isinstance(m, DoEMLP) for m in wrapper.modules()) == L
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        out = wrapper(ids)
        torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
        # topic ids only steer the routers at init: the composed expert is gates @ 0
        torch.testing.assert_close(wrapper(ids, topic_ids=topics).logits, expected, rtol=0, atol=0)
        assert len(out.aux["layers"]) == L and out.next_topic_ids.shape == ids.shape
        wrapper.knowledge_state.normal_()  # the path is live: a non-zero Z changes the logits
        assert not torch.allclose(wrapper(ids).logits, expected)


@pytest.mark.parametrize("options", [dict(fusion="concat"), dict(signal_source="k"), dict(signal_source="q"),
                                     dict(router="vae_softmax"), dict(router="none"), dict(router_decoder=True)],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_variants_start_as_the_original_and_train(family, options):
    base = make_base(family)
    ref = copy.deepcopy(base)
    wrapper = doeify(base, **OPTIONS, **options).eval()
    ids, topics = batch()
    with torch.no_grad():
        torch.testing.assert_close(wrapper(ids, topic_ids=topics).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    wrapper.train()
    out = wrapper(ids, topic_ids=topics, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert wrapper.knowledge_state.grad.abs().sum() > 0
    if options.get("router_decoder"):
        assert out.aux["recon"] > 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradients_reach_the_knowledge_path(family):
    base = make_base(family)
    base_params = {id(p) for p in base.parameters()}
    wrapper = doeify(base, **OPTIONS, alpha=0.1).train()
    added = added_parameters(wrapper, base_params)
    assert {"knowledge_state", "topic_prior.weight", "routers.first.mu.weight", "routers.middle.mu.weight",
            "routers.last.mu.weight"} <= set(added)
    ids, topics = batch()
    out = wrapper(ids, topic_ids=topics, labels=ids)
    ntp, expert = out.aux["ntp"], out.aux["expert"]
    torch.testing.assert_close(out.loss.detach(), 0.9 * ntp + 0.1 * expert)  # eq. 4 (beta = 0)
    out.loss.backward()
    # First step: Z, the embedding projection, the routers (expert loss), the prior and W_s move ...
    first = {n for n, p in added.items() if p.grad is not None and p.grad.abs().sum() > 0}
    for expected in ("knowledge_state", "topic_prior.weight", "routers.first.gate.weight",
                     "routers.middle.gate.weight"):
        assert expected in first, (expected, sorted(first))
    assert any(n.endswith("dual.proj.weight") for n in first)
    assert sum(n.endswith("signal_proj.weight") for n in first) == L - 1  # the last router has no expert loss
    # ... and after one step off the no-op start, every added parameter gets a gradient.
    torch.optim.SGD(wrapper.parameters(), lr=0.5).step()
    wrapper.zero_grad()
    wrapper(ids, topic_ids=topics, labels=ids).loss.backward()
    dead = sorted(n for n, p in added.items() if p.grad is None or p.grad.abs().sum() == 0)
    assert dead == [n for n in dead if n.startswith("routers.last.") and "decoder" in n], dead


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_with_cache_equals_without_and_tracks_topics(family):
    base = make_base(family)
    base_params = {id(p) for p in base.parameters()}
    wrapper = doeify(base, **OPTIONS).eval()
    perturb_knowledge(wrapper, base_params)
    ids, topics = batch(T=5)
    new = 6
    cached = wrapper.generate(ids, topic_ids=topics, max_new_tokens=new, do_sample=False, use_cache=True)
    uncached = wrapper.generate(ids, topic_ids=topics, max_new_tokens=new, do_sample=False, use_cache=False)
    assert cached.shape == (2, 5 + new)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)
    # the same rule by hand: greedy token, and the last router's predicted topic for it
    seq, tops = ids, topics
    with torch.no_grad():
        for _ in range(new):
            out = wrapper(seq, topic_ids=tops, use_cache=False)
            seq = torch.cat([seq, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            tops = torch.cat([tops, out.next_topic_ids[:, -1:]], dim=1)
    torch.testing.assert_close(cached, seq, rtol=0, atol=0)
    # the topics matter: generating from other prompt topics gives other logits
    with torch.no_grad():
        assert not torch.equal(wrapper(ids, topic_ids=topics).logits, wrapper(ids).logits)
    # left padding: a padded row generates what it generates alone (the signal's prefix mean skips pads)
    mask = torch.ones_like(ids)
    mask[0, :2], ids[0, :2], topics[0, :2] = 0, 0, -1
    padded = wrapper.generate(ids, topic_ids=topics, attention_mask=mask, max_new_tokens=new, do_sample=False,
                              pad_token_id=0)
    alone = wrapper.generate(ids[:1, 2:], topic_ids=topics[:1, 2:], max_new_tokens=new, do_sample=False)
    torch.testing.assert_close(padded[0, 2:], alone[0], rtol=0, atol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_knowledge_save_load_round_trip(family, tmp_path):
    from safetensors.torch import load_file

    base = make_base(family)
    fresh = copy.deepcopy(base)
    base_params = {id(p) for p in base.parameters()}
    wrapper = doeify(base, **OPTIONS).eval()
    perturb_knowledge(wrapper, base_params)
    wrapper.save_knowledge(tmp_path / "k")
    saved = load_file(tmp_path / "k" / "doe_knowledge.safetensors")
    added = added_parameters(wrapper, base_params)
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in added.values())  # no base weight
    assert {id(p) for p in wrapper.knowledge_parameters()} == {id(p) for p in added.values()}  # what a PEFT-style run trains

    other = doeify(fresh, **OPTIONS).eval()
    ids, topics = batch()
    with torch.no_grad():
        expected = wrapper(ids, topic_ids=topics).logits
        assert not torch.allclose(other(ids, topic_ids=topics).logits, expected)
        other.load_knowledge(tmp_path / "k")
        torch.testing.assert_close(other(ids, topic_ids=topics).logits, expected, rtol=0, atol=0)

    with pytest.raises(ValueError, match="num_topics"):
        doeify(make_base(family), **{**OPTIONS, "num_topics": K + 1}).load_knowledge(tmp_path / "k")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_pretrained_with_the_base(family, tmp_path):
    base = make_base(family)
    base_params = {id(p) for p in base.parameters()}
    wrapper = doeify(base, **OPTIONS, fusion="concat").eval()
    perturb_knowledge(wrapper, base_params)
    wrapper.save_pretrained(tmp_path)
    assert isinstance(wrapper.doe_layers[0], DoEMLP) and wrapper.doe_layers[0] in list(wrapper.modules())
    loaded = DoEWrapper.from_pretrained(tmp_path).eval()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # the base alone, in its original layout
    assert not any(isinstance(m, DoEMLP) for m in plain.modules())
    ids, topics = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, topic_ids=topics).logits, wrapper(ids, topic_ids=topics).logits,
                                   rtol=0, atol=0)
        torch.testing.assert_close(wrapper.unload()(input_ids=ids).logits, plain(input_ids=ids).logits,
                                   rtol=0, atol=0)


def test_unknown_architecture_names_the_class_and_the_families():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=V, hidden_size=D, num_hidden_layers=1,
                                                           num_attention_heads=4, intermediate_size=48))
    with pytest.raises(ValueError, match=r"GPTNeoXForCausalLM.*gpt_neox.*gpt2, llama, mistral, qwen2"):
        doeify(model)


@pytest.mark.parametrize("bad, field", [(dict(router="moe_topk"), "router"), (dict(fusion="mul"), "fusion"),
                                        (dict(signal_source="o"), "signal_source"), (dict(num_topics=0), "num_topics"),
                                        (dict(alpha=2.0), "alpha")])
def test_bad_options_name_the_field(bad, field):
    with pytest.raises(ValueError, match=f"doeify: {field}="):
        doeify(make_base("llama"), **bad)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(family):
    """Non-reentrant checkpointing keeps every gradient; reentrant is refused by name (it would drop the
    routers' gradients: their outputs leave the HF layer beside its hidden state)."""
    ids, topics = batch()
    reentrant = doeify(make_base(family), **OPTIONS).train()
    reentrant.base_model.activation_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(NotImplementedError, match=r"reentrant gradient checkpointing \(use_reentrant=True\)"):
        reentrant(ids, topic_ids=topics, labels=ids, use_cache=False)
    grads = []
    for checkpointing in (False, True):
        base = make_base(family)
        base_params = {id(p) for p in base.parameters()}
        if checkpointing:
            base.activation_checkpointing_enable({"use_reentrant": False})
        wrapper = doeify(base, **OPTIONS).train()
        perturb_knowledge(wrapper, base_params)
        torch.manual_seed(5)  # the VAE noise
        wrapper(ids, topic_ids=topics, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in wrapper.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_parity_and_generate(dtype):
    base = make_base("llama").to("cuda", dtype)
    ref = copy.deepcopy(base)
    wrapper = doeify(base, **OPTIONS).eval()
    assert wrapper.knowledge_state.device.type == "cuda" and wrapper.knowledge_state.dtype == dtype
    ids, topics = (t.cuda() for t in batch())
    with torch.no_grad():
        torch.testing.assert_close(wrapper(ids, topic_ids=topics).logits, ref(input_ids=ids).logits)
    cached = wrapper.generate(ids, topic_ids=topics, max_new_tokens=4, do_sample=False)
    uncached = wrapper.generate(ids, topic_ids=topics, max_new_tokens=4, do_sample=False, use_cache=False)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_beam_search_equals_a_full_recompute_reference(family):
    """The wrapper's topic history and signal sums live in the DoECache, which beam search reorders."""
    base = make_base(family)
    base_params = {id(p) for p in base.parameters()}
    wrapper = doeify(base, **OPTIONS).eval()
    perturb_knowledge(wrapper, base_params)
    ids, topics = batch(T=5)
    with torch.no_grad():
        out = wrapper.generate(ids, topic_ids=topics, num_beams=3, max_new_tokens=5, do_sample=False)
        for b in range(2):
            assert out[b].tolist() == reference_beam_search(wrapper, ids[b], topics[b], 3, 5)
    with pytest.raises(NotImplementedError, match="beam search needs the KV cache"):
        wrapper.generate(ids, topic_ids=topics, num_beams=2, max_new_tokens=2, use_cache=False)
