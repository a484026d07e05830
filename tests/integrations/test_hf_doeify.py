"""doeify: the DoE knowledge path on pretrained HF causal LMs, table-driven over the families,
against the untouched model (tiny random configs, no downloads)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging

from reference_generation import reference_beam_search

from doe_ext.integrations.hf import DoEifyConfig, DoEMLP, DoEWrapper, FamilyAdapter, derive_adapter, doeify

logging.set_verbosity_error()  # the tiny configs keep the families' default bos/eos ids, outside V
V, D, L, K = 97, 32, 3, 8  # three layers: a first, a shared middle and a last router
LLAMA_LIKE = dict(vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=L, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
GPT_LIKE = dict(vocab_size=V, n_embd=D, n_layer=L, n_head=4, n_positions=64)
FALCON = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4)
# The README's drop-in section lists these families; test id -> (model_type, tiny config, what it exercises).
FAMILIES = {
    "llama": ("llama", LLAMA_LIKE),
    "mistral": ("mistral", LLAMA_LIKE),
    "mixtral": ("mixtral", dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)),  # MoE block as the MLP
    "qwen2": ("qwen2", LLAMA_LIKE),
    "qwen2_moe": ("qwen2_moe", dict(LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=24, decoder_sparse_step=2)),  # dense + MoE layers
    "qwen3": ("qwen3", dict(LLAMA_LIKE, head_dim=8)),
    "gemma": ("gemma", dict(LLAMA_LIKE, head_dim=8)),  # scaled embedding
    "gemma2": ("gemma2", dict(LLAMA_LIKE, head_dim=8)),
    "phi": ("phi", dict(LLAMA_LIKE, num_key_value_heads=4)),  # parallel residual
    "phi3": ("phi3", dict(LLAMA_LIKE, pad_token_id=0)),  # fused [q | k | v] with GQA, fused gate_up
    "gpt2": ("gpt2", GPT_LIKE),  # fused c_attn, Conv1D
    "gpt_neox": ("gpt_neox", dict(vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=L,
                                  num_attention_heads=4, max_position_embeddings=64)),  # per-head interleaved, parallel
    "gptj": ("gptj", dict(GPT_LIKE, rotary_dim=4)),  # parallel residual
    "bloom": ("bloom", dict(vocab_size=V, hidden_size=D, n_layer=L, n_head=4)),  # per-head interleaved, alibi
    "falcon-mqa": ("falcon", dict(FALCON, multi_query=True)),  # one k/v head, parallel
    "falcon-mha": ("falcon", dict(FALCON, multi_query=False)),  # per-head interleaved
    "falcon-new": ("falcon", dict(FALCON, new_decoder_architecture=True, num_kv_heads=2)),  # grouped layout
    "olmo": ("olmo", LLAMA_LIKE),
    "olmo2": ("olmo2", LLAMA_LIKE),  # norms after the sublayers: the MLP sees the residual
    "stablelm": ("stablelm", LLAMA_LIKE),
    "starcoder2": ("starcoder2", LLAMA_LIKE),
    "granite": ("granite", dict(LLAMA_LIKE, embedding_multiplier=2.0, residual_multiplier=0.5)),
    "cohere": ("cohere", LLAMA_LIKE),  # parallel residual
    "opt": ("opt", dict(vocab_size=V, hidden_size=D, ffn_dim=48, num_hidden_layers=L, num_attention_heads=4,
                        max_position_embeddings=64, word_embed_proj_dim=D)),  # no MLP module, flattened states
    "qwen3_moe": ("qwen3_moe", dict(LLAMA_LIKE, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=16)),
    "gemma3_text": ("gemma3_text", dict(LLAMA_LIKE, head_dim=8)),  # sliding and global layers, scaled embedding
    "phimoe": ("phimoe", dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)),
    "olmoe": ("olmoe", dict(LLAMA_LIKE, num_experts=4, num_experts_per_tok=2)),
    "granitemoe": ("granitemoe", dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)),
    "granitemoeshared": ("granitemoeshared", dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2,
                                                  shared_intermediate_size=16)),
    "cohere2": ("cohere2", LLAMA_LIKE),
    "gpt_bigcode": ("gpt_bigcode", dict(GPT_LIKE, multi_query=True)),  # fused c_attn, one shared k and v head
    "codegen": ("codegen", dict(GPT_LIKE, rotary_dim=4)),  # fused qkv_proj in its own layout
    "helium": ("helium", dict(LLAMA_LIKE, head_dim=8)),
    "nemotron": ("nemotron", dict(LLAMA_LIKE, partial_rotary_factor=0.5)),
    "persimmon": ("persimmon", LLAMA_LIKE),  # fused query_key_value
    "biogpt": ("biogpt", dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
                              intermediate_size=48, max_position_embeddings=64)),  # flat fc1 / fc2
    "xglm": ("xglm", dict(vocab_size=V, d_model=D, num_layers=L, attention_heads=4, ffn_dim=48,
                          max_position_embeddings=64)),
    "exaone4": ("exaone4", dict(LLAMA_LIKE, head_dim=8)),
    "gpt_oss": ("gpt_oss", dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, head_dim=8)),
    "llama4_text": ("llama4_text", dict(LLAMA_LIKE, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                                        intermediate_size_mlp=48)),
    "hunyuan_v1_dense": ("hunyuan_v1_dense", dict(LLAMA_LIKE, head_dim=8)),
    "seed_oss": ("seed_oss", dict(LLAMA_LIKE, head_dim=8)),
    "ernie4_5": ("ernie4_5", dict(LLAMA_LIKE, head_dim=8)),
}
# MoE blocks as the MLP in some layer: no input projections for fusion="concat" to widen
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "phimoe", "olmoe", "granitemoe", "granitemoeshared", "gpt_oss", "llama4_text"}
OPTIONS = dict(num_topics=K, topic_dim=4, latent_dim=8)


def make_base(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model_type, kwargs = FAMILIES[family]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))
    model.generation_config.eos_token_id = None  # generate runs max_new_tokens; no early stop
    model.generation_config.pad_token_id = None  # no attention mask inferred from a pad id in the random prompts
    return model.eval()


def batch(seed: int = 1, B: int = 2, T: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    topics = torch.randint(-1, K, (B, T), generator=g)  # -1: unlabeled
    return ids, topics


def added_parameters(wrapper: DoEWrapper, base_params: set[int]) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in wrapper.named_parameters() if id(p) not in base_params}


def perturb_knowledge(wrapper: DoEWrapper, seed: int = 3) -> DoEWrapper:
    """Move every added parameter off its no-op start, so the knowledge path changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in wrapper.knowledge_parameters():  # the added parameters (test_knowledge_save_load_round_trip)
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return wrapper


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
    # greedy generate (KV cache) is the original's too
    want = ref.generate(ids, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(wrapper.generate(ids, topic_ids=topics, max_new_tokens=5, do_sample=False), want,
                               rtol=0, atol=0)
    with torch.no_grad():
        wrapper.knowledge.knowledge_state.normal_()  # the path is live: a non-zero Z changes the logits
        assert not torch.allclose(wrapper(ids).logits, expected)
        # unload() gives the original model back, module for module
        plain = wrapper.unload()
        assert [(n, type(m)) for n, m in plain.named_modules()] == [(n, type(m)) for n, m in ref.named_modules()]
        assert plain.state_dict().keys() == ref.state_dict().keys()
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("options", [dict(fusion="concat"), dict(signal_source="k"), dict(signal_source="q"),
                                     dict(router="vae_softmax"), dict(router="none"), dict(router_decoder=True),
                                     dict(dtype=torch.bfloat16), dict(dtype=torch.float16)],  # half types on the CPU
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "falcon-new", "opt"])  # separate, fused, grouped, flat
def test_variants_start_as_the_original_and_train(family, options):
    options = dict(options)
    dtype = options.pop("dtype", torch.float32)
    base = make_base(family).to(dtype)
    ref = copy.deepcopy(base)
    wrapper = doeify(base, **OPTIONS, **options).eval()
    assert wrapper.knowledge.knowledge_state.dtype == dtype
    ids, topics = batch()
    with torch.no_grad():
        torch.testing.assert_close(wrapper(ids, topic_ids=topics).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    wrapper.train()
    out = wrapper(ids, topic_ids=topics, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and wrapper.knowledge.knowledge_state.grad.dtype == dtype
    assert wrapper.knowledge.knowledge_state.grad.abs().sum() > 0
    if options.get("router_decoder"):
        assert out.aux["recon"] > 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradients_reach_the_knowledge_path(family):
    base = make_base(family)
    base_params = {id(p) for p in base.parameters()}
    wrapper = doeify(base, **OPTIONS, alpha=0.1).train()
    added = added_parameters(wrapper, base_params)
    assert {"knowledge.knowledge_state", "knowledge.topic_prior.weight", "knowledge.routers.first.mu.weight",
            "knowledge.routers.middle.mu.weight", "knowledge.routers.last.mu.weight"} <= set(added)
    ids, topics = batch()
    out = wrapper(ids, topic_ids=topics, labels=ids)
    ntp, expert = out.aux["ntp"], out.aux["expert"]
    torch.testing.assert_close(out.loss.detach(), 0.9 * ntp + 0.1 * expert)  # eq. 4 (beta = 0)
    out.loss.backward()
    # First step: Z, the embedding projection, the routers (expert loss), the prior and W_s move ...
    first = {n for n, p in added.items() if p.grad is not None and p.grad.abs().sum() > 0}
    for expected in ("knowledge.knowledge_state", "knowledge.topic_prior.weight", "knowledge.routers.first.gate.weight",
                     "knowledge.routers.middle.gate.weight"):
        assert expected in first, (expected, sorted(first))
    assert any(n.endswith("dual.proj.weight") for n in first)
    assert sum(n.endswith("signal_proj.weight") for n in first) == L - 1  # the last router has no expert loss
    # ... and after one step off the no-op start, every added parameter gets a gradient.
    torch.optim.SGD(wrapper.parameters(), lr=0.5).step()
    wrapper.zero_grad()
    wrapper(ids, topic_ids=topics, labels=ids).loss.backward()
    dead = sorted(n for n, p in added.items() if p.grad is None or p.grad.abs().sum() == 0)
    assert dead == [n for n in dead if n.startswith("knowledge.routers.last.") and "decoder" in n], dead


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_with_cache_equals_without_and_tracks_topics(family):
    wrapper = perturb_knowledge(doeify(make_base(family), **OPTIONS).eval())
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
    assert all(p.requires_grad for p in wrapper.parameters())  # doeify trains everything unless told (README)
    perturb_knowledge(wrapper)
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


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_pretrained_with_the_base(family, tmp_path):
    base = make_base(family)
    wrapper = doeify(base, **OPTIONS, fusion="add" if family in MOE else "concat").eval()
    perturb_knowledge(wrapper)
    wrapper.save_pretrained(tmp_path)
    assert isinstance(wrapper.doe_layers[0], DoEMLP) and wrapper.doe_layers[0] in list(wrapper.modules())
    loaded = DoEWrapper.from_pretrained(tmp_path).eval()
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # model type "doe_ext_drop_in": the drop-in again
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # the base alone, in its original layout
    assert isinstance(auto, DoEWrapper) and not any(isinstance(m, DoEMLP) for m in plain.modules())
    assert "AutoModelForCausalLM.from_pretrained" in (tmp_path / "README.md").read_text()  # the folder says how
    ids, topics = batch()
    with torch.no_grad():
        expected = wrapper(ids, topic_ids=topics).logits
        torch.testing.assert_close(loaded(ids, topic_ids=topics).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(auto(ids, topic_ids=topics).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(wrapper.unload()(input_ids=ids).logits, plain(input_ids=ids).logits,
                                   rtol=0, atol=0)


def test_a_saved_drop_in_never_loads_as_the_plain_base(tmp_path):
    """Without doe_ext, transformers refuses the folder by its model type (it does not silently load
    the base without its knowledge path); a folder of the older layout (the base at its top, before
    model type "doe_ext_drop_in") still loads with DoEWrapper.from_pretrained."""
    import subprocess
    import sys

    wrapper = doeify(make_base("llama"), **OPTIONS).eval()
    perturb_knowledge(wrapper)
    wrapper.save_pretrained(tmp_path / "new")
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\ntry:\n    AutoModelForCausalLM."
            "from_pretrained(sys.argv[1])\nexcept (ValueError, KeyError) as e:\n    print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "new")], capture_output=True, text=True)
    assert "doe_ext_drop_in" in out.stdout and "doe_ext" not in "".join(out.stderr.split("site-packages")), out
    with wrapper.original_modules() as base:  # the older layout
        base.save_pretrained(tmp_path / "old")
    wrapper.save_knowledge(tmp_path / "old")
    ids, topics = batch()
    with torch.no_grad():
        torch.testing.assert_close(DoEWrapper.from_pretrained(tmp_path / "old").eval()(ids, topic_ids=topics).logits,
                                   wrapper(ids, topic_ids=topics).logits, rtol=0, atol=0)


def test_unsupported_models_say_why():
    torch.manual_seed(0)
    mamba = AutoModelForCausalLM.from_config(AutoConfig.for_model("mamba", vocab_size=V, hidden_size=D,
                                                                  num_hidden_layers=2, state_size=4))
    with pytest.raises(ValueError, match=r"MambaForCausalLM has no nn.ModuleList of num_hidden_layers=2 decoder "
                                         r"layers with an attention child"):
        doeify(mamba)
    # multi-head latent attention: no q/k/v projection to read the router's signal from
    deepseek = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "deepseek_v3", vocab_size=V, hidden_size=D, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=L,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
        n_group=1, topk_group=1)).eval()
    ref = copy.deepcopy(deepseek)
    with pytest.raises(ValueError, match=r"DeepseekV3Attention has no q/k/v projections.*signal_source='none'"):
        doeify(copy.deepcopy(deepseek), **OPTIONS)
    wrapper = doeify(deepseek, **OPTIONS, signal_source="none").eval()  # what the message offers works
    ids, topics = batch()
    with torch.no_grad():
        torch.testing.assert_close(wrapper(ids, topic_ids=topics).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    # a hybrid whose layers' attentions differ (lightning attention in layer 1): refused by layer, not a crash
    minimax = AutoModelForCausalLM.from_config(AutoConfig.for_model("minimax", **LLAMA_LIKE, num_local_experts=2,
                                                                    num_experts_per_tok=1))
    with pytest.raises(ValueError, match=r"layer 1's MiniMaxLightningAttention has no v_proj .*signal_source='none'"):
        doeify(minimax, **OPTIONS)
    gpt_neo = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt_neo", vocab_size=V, hidden_size=D, num_layers=2, num_heads=4, max_position_embeddings=64,
        attention_types=[[["global", "local"], 1]]))
    with pytest.raises(ValueError, match=r"GPTNeoAttention has no q/k/v projections doeify can find"):
        doeify(gpt_neo, **OPTIONS)
    with pytest.raises(ValueError, match=r"fusion='concat' .* layer 0's MixtralSparseMoeBlock has none.*fusion='add'"):
        doeify(make_base("mixtral"), **OPTIONS, fusion="concat")
    with pytest.raises(ValueError, match=r"layer 1's Qwen2MoeSparseMoeBlock has none"):  # layer 0 is dense
        doeify(make_base("qwen2_moe"), **OPTIONS, fusion="concat")


def test_each_forward_has_its_own_scope():
    """A forward's topics do not leak into the next, its state is gone when it ends (by an exception
    too), and the wrapped modules refuse to run outside a wrapper's forward: per-call state has one
    way in (the wrapper's scope), no keyword slipped through the base model's call."""
    base = make_base("llama")
    wrapper = doeify(base, **OPTIONS).eval()
    with pytest.raises(RuntimeError, match="DoEMLP: runs inside a forward of its DoEWrapper .*not the base model"):
        wrapper.doe_layers[0](torch.randn(2, 7, D))  # outside any forward: no state to read
    perturb_knowledge(wrapper)
    ids, topics = batch()
    with torch.no_grad():
        with_topics = wrapper(ids, topic_ids=topics).logits
        assert wrapper.scope.get() is None  # nothing of the forward outlives it
        # the same ids tensor, embedded outside a forward: the token part, not the last forward's topics
        torch.testing.assert_close(wrapper.base_model.get_input_embeddings()(ids),
                                   wrapper.get_input_embeddings()(ids), rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="call the wrapper that doeify returned"):
            wrapper.base_model(input_ids=ids)
        assert not torch.allclose(wrapper(ids).logits, with_topics)
        with pytest.raises(IndexError):  # a forward that fails half-way leaves no state behind either
            wrapper(torch.full_like(ids, V + 5), topic_ids=topics)
        assert wrapper.scope.get() is None
        torch.testing.assert_close(wrapper(ids, topic_ids=topics).logits, with_topics, rtol=0, atol=0)


def test_any_token_embedding_module_is_kept():
    """The wrapper calls the base's own embedding module for the token part, so one that is not a
    plain lookup keeps the base's logits at init (the topic part is added to its output)."""
    class Doubled(torch.nn.Embedding):
        def forward(self, ids):
            return 2 * super().forward(ids)

    base = make_base("llama")
    base.model.embed_tokens = Doubled(V, D)
    ref = copy.deepcopy(base)
    wrapper = doeify(base, **OPTIONS).eval()
    ids, topics = batch()
    with torch.no_grad():
        torch.testing.assert_close(wrapper(ids, topic_ids=topics).logits, ref(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inputs_embeds_equal_input_ids(family):
    """transformers' idiom: ``inputs_embeds=wrapper.get_input_embeddings()(ids)`` with the same topics
    gives the logits of ``ids``, with trained knowledge (the projection is no longer ``[I | 0]``);
    gemma's scaled embedding included."""
    wrapper = perturb_knowledge(doeify(make_base(family), **OPTIONS)).eval()
    ids, topics = batch()
    with torch.no_grad():
        embeds = wrapper.get_input_embeddings()(ids)
        want = wrapper(ids, topic_ids=topics).logits
        assert not torch.allclose(wrapper(ids).logits, want)  # the topics matter
        torch.testing.assert_close(wrapper(inputs_embeds=embeds, topic_ids=topics).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(wrapper(inputs_embeds=embeds).logits, wrapper(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass exactly one of `input_ids` and `inputs_embeds`"):
        wrapper(ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match=r"topic_ids must have the shape of input_ids .* \(2, 7\), got \(2, 6\)"):
        wrapper(inputs_embeds=embeds, topic_ids=topics[:, 1:])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_router_reads_the_values_the_attention_uses(family):
    """The signal taken from the (fused) projection is the attention's own v, heads in order: recorded
    where the attention hands v to its kernel (the attention interface; BLOOM's and Falcon's own splits)."""
    from transformers import AttentionInterface

    if family in ("xglm",):
        pytest.skip("XGLM's attention computes its scores itself (no attention interface to record v at); "
                    "its separate v_proj is the signal")
    base = make_base(family)
    adapter = derive_adapter(base)
    seen, used = [], []

    class Recorded(Exception):  # v is all the test needs: stop the forward there
        pass
    attn = dict(base.named_modules())[f"{adapter.layers}.0.{adapter.attention}"]
    if adapter.qkv is not None:
        attn.get_submodule(adapter.qkv[2]).register_forward_hook(lambda m, a, out: seen.append(out))
    else:
        attn.get_submodule(adapter.fused_qkv.path).register_forward_hook(
            lambda m, a, out: seen.append(adapter.fused_qkv.split(out, "v")))
    split = next((n for n in ("_split_heads", "_reshape") if hasattr(attn, n)), None)
    if split is not None:  # BLOOM, Falcon: no attention interface; record their own split
        own = getattr(attn, split)

        def recording(fused):
            v = own(fused)[2]
            used.append(v if split == "_split_heads" else v.transpose(1, 2))  # -> (B, T, heads, hd)
            raise Recorded
        setattr(attn, split, recording)
    else:
        def record(module, q, k, v, *args, **kwargs):
            used.append(v.transpose(1, 2))  # (B, heads, T, hd) -> (B, T, heads, hd)
            raise Recorded
        AttentionInterface.register("doe_record", record)
        base.set_attn_implementation("doe_record")
    ids, _ = batch()
    with torch.no_grad(), pytest.raises(Recorded):
        base(input_ids=ids, use_cache=False)
    assert len(seen) == 1 and len(used) == 1, (len(seen), len(used))
    v = used[0]
    heads = seen[0].shape[-1] // v.shape[-1]
    v = v[:, :, ::v.shape[2] // heads]  # Falcon broadcasts each k/v head over its query group
    torch.testing.assert_close(seen[0], v.flatten(2), rtol=0, atol=0)


def test_a_custom_adapter_is_saved_and_reloaded(tmp_path):
    base = make_base("llama")
    derived = derive_adapter(base)
    custom = FamilyAdapter(**{**derived.to_dict(), "mlp_inputs": ("up_proj",)})  # widen one projection only
    wrapper = doeify(base, **OPTIONS, fusion="concat", adapter=custom).eval()
    perturb_knowledge(wrapper)
    wrapper.save_pretrained(tmp_path)
    loaded = DoEWrapper.from_pretrained(tmp_path).eval()
    assert loaded.adapter == custom and loaded.adapter != derived
    ids, topics = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, topic_ids=topics).logits, wrapper(ids, topic_ids=topics).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("bad, field", [(dict(router="moe_topk"), "router"), (dict(fusion="mul"), "fusion"),
                                        (dict(signal_source="o"), "signal_source"), (dict(num_topics=0), "num_topics"),
                                        (dict(alpha=2.0), "alpha")])
def test_bad_options_name_the_field(bad, field):
    with pytest.raises(ValueError, match=f"DoEifyConfig.{field}="):
        doeify(make_base("llama"), **bad)
    with pytest.raises(ValueError, match=f"DoEifyConfig.{field}="):  # validated once, wherever it is built
        DoEifyConfig(**bad)


def test_options_are_one_config():
    config = DoEifyConfig(**OPTIONS, fusion="concat")
    wrapper = doeify(make_base("llama"), config, alpha=0.2)  # keyword options override the config's fields
    assert wrapper.doe_config == DoEifyConfig(**OPTIONS, fusion="concat", alpha=0.2)
    assert doeify(make_base("llama"), **OPTIONS).doe_config == DoEifyConfig(**OPTIONS)
    with pytest.raises(TypeError, match=r"doeify: unknown option\(s\) \['num_topic'\]"):
        doeify(make_base("llama"), num_topic=4)
    with pytest.raises(ValueError, match=r"DoEifyConfig.router='moe_topk': expected one of \('vae_relu'"):
        DoEifyConfig(router="moe_topk")  # DoEConfig's baseline replaces the MLP: not a wrapper option


def test_every_knowledge_option_of_the_native_model_is_a_wrapper_option():
    from dataclasses import fields

    from doe_ext.models import DoEConfig

    native_only = {"blocks", "block_ffn_dim", "knowledge", "topic_input",  # the native model's own architecture
                   "num_experts", "num_experts_per_tok", "router_aux_loss_coef"}  # and its MoE baseline
    wrapper = {f.name for f in fields(DoEifyConfig)}
    knowledge = set(DoEConfig.__annotations__) - native_only  # DoEConfig's own fields
    assert knowledge <= wrapper, knowledge - wrapper


@pytest.mark.parametrize("supervise_last", [False, True])
def test_supervise_last_router(supervise_last):
    """L_expert averages every router but the last; ``supervise_last_router`` adds the last (as DoEConfig's)."""
    from doe_ext.losses import expert_loss

    wrapper = perturb_knowledge(doeify(make_base("llama"), **OPTIONS, alpha=0.5, supervise_last_router=supervise_last))
    ids, topics = batch()
    calls = []  # the forward's state, seen from inside it (none is left after it)
    wrapper.doe_layers[-1].register_forward_hook(lambda module, args, out: calls.append(wrapper.scope.get()))
    out = wrapper(ids, topic_ids=topics, labels=ids)
    routed = calls[0].step.routed
    per_layer = [expert_loss(routed[i].logits[:, :-1], topics[:, 1:], ignore_index=-1) for i in sorted(routed)]
    want = torch.stack(per_layer if supervise_last else per_layer[:-1]).mean()
    torch.testing.assert_close(out.aux["expert"], want.detach())


@pytest.mark.parametrize("options", [{}, dict(router_decoder=True, beta=0.1, fusion="concat")],
                         ids=["default", "decoder-beta-concat"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_gradient_checkpointing_gives_the_same_gradients(family, options):
    """Reentrant and non-reentrant checkpointing against none: the same loss and the same gradient
    for every parameter (the expert-label, KL and reconstruction terms included: the routers'
    tensors leave each checkpointed layer as its outputs)."""
    ids, topics = batch()
    results = {}
    for mode in ("none", "reentrant", "non-reentrant"):
        base = make_base(family)
        if mode != "none":
            base.activation_checkpointing_enable({"use_reentrant": mode == "reentrant"})
        wrapper = doeify(base, **OPTIONS, alpha=0.3, **options).train()
        perturb_knowledge(wrapper)
        torch.manual_seed(5)  # the VAE noise
        out = wrapper(ids, topic_ids=topics, labels=ids, use_cache=False)
        out.loss.backward()
        results[mode] = out.loss.detach(), {n: p.grad for n, p in wrapper.named_parameters() if p.grad is not None}
    loss, grads = results["none"]
    assert any(n.startswith("knowledge.routers.") for n in grads)
    for mode in ("reentrant", "non-reentrant"):
        torch.testing.assert_close(results[mode][0], loss)
        assert results[mode][1].keys() == grads.keys(), mode
        for name in grads:
            torch.testing.assert_close(results[mode][1][name], grads[name], msg=lambda m: f"{mode} {name}: {m}")


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_with_two_forwards_before_the_backwards(reentrant):
    """Gradient accumulation: forward A, forward B, then both backwards. Each recomputed layer gets
    its own forward's topics and signals back, so the gradients are those of no checkpointing."""
    (ids_a, top_a), (ids_b, top_b) = batch(seed=1), batch(seed=2)
    grads = []
    for checkpointing in (False, True):
        base = make_base("llama")
        if checkpointing:
            base.activation_checkpointing_enable({"use_reentrant": reentrant})
        wrapper = perturb_knowledge(doeify(base, **OPTIONS, alpha=0.3).train())
        torch.manual_seed(5)
        loss_a = wrapper(ids_a, topic_ids=top_a, labels=ids_a, use_cache=False).loss
        loss_b = wrapper(ids_b, topic_ids=top_b, labels=ids_b, use_cache=False).loss
        (loss_a + loss_b).backward()
        grads.append({n: p.grad for n, p in wrapper.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_parity_and_generate(dtype):
    base = make_base("llama").to("cuda", dtype)
    ref = copy.deepcopy(base)
    wrapper = doeify(base, **OPTIONS).eval()
    assert wrapper.knowledge.knowledge_state.device.type == "cuda" and wrapper.knowledge.knowledge_state.dtype == dtype
    ids, topics = (t.cuda() for t in batch())
    with torch.no_grad():
        torch.testing.assert_close(wrapper(ids, topic_ids=topics).logits, ref(input_ids=ids).logits)
    cached = wrapper.generate(ids, topic_ids=topics, max_new_tokens=4, do_sample=False)
    uncached = wrapper.generate(ids, topic_ids=topics, max_new_tokens=4, do_sample=False, use_cache=False)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_beam_search_equals_a_full_recompute_reference(family):
    """The wrapper's topic history and signal sums live in the DoECache, which beam search reorders."""
    wrapper = perturb_knowledge(doeify(make_base(family), **OPTIONS).eval())
    ids, topics = batch(T=5)
    with torch.no_grad():
        out = wrapper.generate(ids, topic_ids=topics, num_beams=3, max_new_tokens=5, do_sample=False)
        for b in range(2):
            assert out[b].tolist() == reference_beam_search(wrapper, ids[b], topics[b], 3, 5)
    with pytest.raises(NotImplementedError, match="beam search needs the KV cache"):
        wrapper.generate(ids, topic_ids=topics, num_beams=2, max_new_tokens=2, use_cache=False)

