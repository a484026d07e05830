"""DoEForCausalLM honours transformers' conventions (issue 12, parts 2-4): the model output, its
flags, ``inputs_embeds``; gradient checkpointing (reentrant or not) gives the gradients of no
checkpointing; the DoE cache follows every cache operation of generation, so beam search equals a
beam search that recomputes every beam from scratch."""
from __future__ import annotations

import pytest
import torch
from reference_generation import reference_beam_search
from test_doe_model import V, batch, tiny
from transformers import AutoModel

from doe_ext.models import DoEForCausalLM
from doe_ext.models.cache import DoECache
from doe_ext.models.modeling_doe import DoEModelOutput


def test_model_output_flags_and_tuples():
    model = DoEForCausalLM(tiny(attn_implementation="eager")).eval()
    ids, topics = batch()
    out = model.model(ids, topic_ids=topics, output_hidden_states=True, output_attentions=True)
    assert isinstance(out, DoEModelOutput) and out.last_hidden_state.shape == (2, 9, 32)
    assert len(out.hidden_states) == 4 and out.hidden_states[-1] is out.last_hidden_state
    assert [tuple(a.shape) for a in out.attentions] == [(2, 4, 9, 9)] * 3
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 9))  # softmax rows
    assert [r is not None for r in out.router_outputs] == [True, True, True] and out.moe_balances == ()
    full = model(ids, topic_ids=topics, labels=ids)
    as_tuple = model(ids, topic_ids=topics, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], full.loss)
    torch.testing.assert_close(as_tuple[1], full.logits)
    hidden = model(ids, topic_ids=topics, output_hidden_states=True).hidden_states
    assert len(hidden) == 4 and model(ids, topic_ids=topics).hidden_states is None
    auto = AutoModel.from_config(tiny())
    assert isinstance(auto(ids, topic_ids=topics), DoEModelOutput)


@pytest.mark.parametrize("overrides", [{}, {"knowledge": False, "topic_input": True}, {"knowledge": False}])
def test_inputs_embeds_equal_input_ids(overrides):
    """transformers' idiom (PEFT's prompt tuning, TRL, generation from embeddings):
    ``inputs_embeds=model.get_input_embeddings()(ids)`` with the same topics gives the logits of ``ids``,
    with a trained projection (not ``[I | 0]``, which would hide a projection applied twice)."""
    torch.manual_seed(0)
    model = DoEForCausalLM(tiny(**overrides)).eval()
    with torch.no_grad():
        for p in model.model.embed_tokens.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ids, topics = batch()
    embeds = model.get_input_embeddings()(ids)
    assert embeds.shape == (*ids.shape, 32)
    want = model(ids, topic_ids=topics).logits
    if model.config.has_topic_input:
        assert not torch.allclose(model(ids).logits, want)  # the topics matter
    torch.testing.assert_close(model(inputs_embeds=embeds, topic_ids=topics).logits, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass exactly one of `input_ids` and `inputs_embeds`"):
        model(ids, inputs_embeds=embeds)


def test_set_input_embeddings_keeps_the_topic_part():
    model = DoEForCausalLM(tiny()).eval()
    dual = model.model.embed_tokens
    table = torch.nn.Embedding(V, 32)
    model.set_input_embeddings(table)
    assert model.model.embed_tokens is dual and dual.token_weight is table.weight
    assert model.get_input_embeddings().weight is table.weight
    with pytest.raises(ValueError, match="`value` has width 5, the model 32"):
        model.set_input_embeddings(torch.nn.Embedding(V, 5))


@pytest.mark.parametrize("overrides", [{"beta": 0.1, "router_decoder": True, "blocks": "ffn"},
                                       {"router": "moe_topk", "num_experts": 4}])
def test_gradient_checkpointing_keeps_every_gradient(overrides):
    """Reentrant and non-reentrant checkpointing against none: the same loss and the same gradient
    for every parameter (the expert-label, KL, reconstruction and balance terms included)."""
    torch.manual_seed(0)
    model = DoEForCausalLM(tiny(alpha=0.3, **overrides)).train()
    ids, topics = batch()

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the VAE's noise
        out = model(ids, topic_ids=topics, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, want = grads()
    assert any("routers" in n for n in want) or "moe" in str(overrides)
    for reentrant in (False, True):
        model.activation_checkpointing_enable({"use_reentrant": reentrant})
        got_loss, got = grads()
        model.activation_checkpointing_disable()
        torch.testing.assert_close(got_loss, loss)
        assert set(got) == set(want), (reentrant, set(want) ^ set(got))
        for n in want:
            torch.testing.assert_close(got[n], want[n], msg=lambda m, n=n: f"{n} (reentrant={reentrant}): {m}")


@pytest.mark.parametrize("signal", ["v", "none"])
def test_beam_search_equals_a_full_recompute_reference(signal):
    torch.manual_seed(0)
    model = DoEForCausalLM(tiny(signal_source=signal)).eval()
    ids, topics = batch(B=2, T=5)
    with torch.no_grad():
        out = model.generate(ids, topic_ids=topics, num_beams=3, max_new_tokens=5, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        for b in range(2):
            assert out[b].tolist() == reference_beam_search(model, ids[b], topics[b], 3, 5)
    with pytest.raises(NotImplementedError, match="beam search needs the KV cache"):
        model.generate(ids, topic_ids=topics, num_beams=2, max_new_tokens=2, use_cache=False, eos_token_id=None)


def test_the_cache_state_follows_crop_select_and_repeat():
    """After each cache operation, continuing from the cache equals an uncached forward of the
    sequences the cache now stands for (signal sums and predicted topics included)."""
    torch.manual_seed(0)
    model = DoEForCausalLM(tiny()).eval()
    ids, topics = batch(B=3, T=8)
    more, more_t = batch(B=3, T=2)

    def cont(cache, x, t):
        return model(x, topic_ids=t, cache=cache, use_cache=True).logits

    def full(x, t):
        return model(x, topic_ids=t).logits

    with torch.no_grad():
        cache = DoECache(config=model.config)
        model(ids, topic_ids=topics, cache=cache, use_cache=True)
        assert cache.doe.topics.shape == (3, 8) and len(cache.doe.sums) == 3
        cache.crop(-3)  # drop 3 of the 8 positions
        assert cache.get_seq_length() == 5 and cache.doe.topics.shape == (3, 5)
        got = cont(cache, more, more_t)
        torch.testing.assert_close(got, full(torch.cat([ids[:, :5], more], 1), torch.cat([topics[:, :5], more_t], 1))[:, -2:])

        cache = DoECache(config=model.config)
        model(ids, topic_ids=topics, cache=cache, use_cache=True)
        pick = torch.tensor([2, 0])
        cache.batch_select_indices(pick)
        got = cont(cache, more[:2], more_t[:2])
        want = full(torch.cat([ids[pick], more[:2]], 1), torch.cat([topics[pick], more_t[:2]], 1))[:, -2:]
        torch.testing.assert_close(got, want)

        cache = DoECache(config=model.config)
        model(ids[:1], topic_ids=topics[:1], cache=cache, use_cache=True)
        cache.batch_repeat_interleave(3)
        got = cont(cache, more, more_t)
        torch.testing.assert_close(got, full(torch.cat([ids[:1].expand(3, -1), more], 1),
                                             torch.cat([topics[:1].expand(3, -1), more_t], 1))[:, -2:])


@pytest.mark.parametrize("overrides", [{}, {"knowledge": False}])
def test_resize_token_embeddings_keeps_the_old_vocabulary(overrides):
    torch.manual_seed(0)
    model = DoEForCausalLM(tiny(**overrides)).eval()
    ids, topics = batch()
    with torch.no_grad():  # (a graph kept alive across transformers' in-place resize breaks its backward, Llama's too)
        before = model(ids, topic_ids=topics).logits
    model.resize_token_embeddings(V + 7)
    assert model.config.vocab_size == V + 7 and model.get_input_embeddings().weight.shape[0] == V + 7
    after = model(ids, topic_ids=topics).logits
    assert after.shape[-1] == V + 7
    torch.testing.assert_close(after[..., :V], before)  # old tokens: the same outputs
    new = torch.full_like(ids, V + 3)  # a new token trains
    out = model.train()(new, topic_ids=topics, labels=new)
    out.loss.backward()
    assert model.get_input_embeddings().weight.grad[V + 3].abs().sum() > 0


@pytest.mark.parametrize("overrides", [{}, {"knowledge": False}])
def test_tied_word_embeddings(overrides, tmp_path):
    torch.manual_seed(0)
    model = DoEForCausalLM(tiny(tie_word_embeddings=True, **overrides)).eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids, topics = batch()
    want = model(ids, topic_ids=topics).logits
    model.save_pretrained(tmp_path)
    again = DoEForCausalLM.from_pretrained(tmp_path).eval()
    assert again.lm_head.weight is again.get_input_embeddings().weight
    torch.testing.assert_close(again(ids, topic_ids=topics).logits, want)
    again.resize_token_embeddings(V + 2)
    assert again.lm_head.weight is again.get_input_embeddings().weight and again.lm_head.weight.shape[0] == V + 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("overrides", [{}, {"fusion": "concat", "blocks": "ffn"}])
def test_half_precision_on_the_cpu(dtype, overrides):
    """``.to(bfloat16 / float16)`` on the CPU: forward and backward run (the ops in float32 math)
    and stay near the float32 model: loss within 2%, gradients in the float32 gradients' direction."""
    torch.manual_seed(0)
    ref = DoEForCausalLM(tiny(alpha=0.1, **overrides)).eval()  # eval: no VAE noise, the same function
    half = DoEForCausalLM(tiny(alpha=0.1, **overrides)).eval()
    half.load_state_dict(ref.state_dict())
    half.to(dtype)
    ids, topics = batch()
    out_ref, out = ref(ids, topic_ids=topics, labels=ids), half(ids, topic_ids=topics, labels=ids)
    assert out.logits.dtype == dtype
    torch.testing.assert_close(out.loss.float(), out_ref.loss, rtol=0.02, atol=0)
    out_ref.loss.backward()
    out.loss.backward()
    for (name, p_ref), p in zip(ref.named_parameters(), half.parameters()):
        if p_ref.grad is None or p_ref.grad.norm() < 1e-3 * out_ref.loss.item():
            continue  # a (near-)zero gradient has no direction to compare
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all(), name
        cos = torch.nn.functional.cosine_similarity(p.grad.float().flatten(), p_ref.grad.flatten(), dim=0)
        assert cos > 0.98, (name, cos.item())
    generated = half.generate(ids[:, :4], topic_ids=topics[:, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 7)


def test_checkpoints_keep_their_layout(tmp_path):
    """Z, the routers and the topic prior live in one module (``model.knowledge``); checkpoints keep the
    layout written before it (``model.knowledge_state``, ``model.routers.*``, ``model.topic_prior.*``),
    and both the causal LM and the bare model (no ``model.`` prefix) load it back exactly."""
    from safetensors import safe_open

    torch.manual_seed(0)
    model = DoEForCausalLM(tiny(router_decoder=True)).eval()
    ids, topics = batch()
    model.save_pretrained(tmp_path / "lm")
    model.model.save_pretrained(tmp_path / "bare")
    for folder, prefix in (("lm", "model."), ("bare", "")):
        with safe_open(tmp_path / folder / "model.safetensors", "pt") as f:
            keys = set(f.keys())
        assert {f"{prefix}knowledge_state", f"{prefix}routers.last.decoder.weight", f"{prefix}topic_prior.weight"} <= keys
        assert not any("knowledge." in k for k in keys)
    again = DoEForCausalLM.from_pretrained(tmp_path / "lm").eval()
    torch.testing.assert_close(again(ids, topic_ids=topics).logits, model(ids, topic_ids=topics).logits, rtol=0, atol=0)
    bare = AutoModel.from_pretrained(tmp_path / "bare").eval()
    torch.testing.assert_close(bare(ids, topic_ids=topics).last_hidden_state,
                               model.model(ids, topic_ids=topics).last_hidden_state, rtol=0, atol=0)
