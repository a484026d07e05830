"""doe_ext.nn.lean.LeanDecoder: a decoding step without transformers' per-module Python gives the model's
own ``forward`` logits (bitwise with ATen's linears, to rounding with streamed ones and with the fused
lean ops), and DMoE's
decoding through it gives the tokens, triggers and entropies of DMoE through the model's ``forward``."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

from dmoe_testing import QUESTIONS, random_bank, tiny_model
from doe_ext.dmoe import DMoE, load_base
from doe_ext.dmoe.cache import PreallocatedCache
from doe_ext.nn.lean import LeanDecoder
from doe_ext.nn.streaming import streaming_linears


def llama(kv_heads: int, bias: bool = False):
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=kv_heads, attention_bias=bias, mlp_bias=bias,
                      max_position_embeddings=256, initializer_range=0.3)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("model", [pytest.param(lambda: llama(2), id="gqa"), pytest.param(lambda: llama(6, True), id="mha-bias"),
                                   pytest.param(lambda: tiny_model("llama").eval(), id="tiny")])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("path", ["aten", "streamed", "fused"])
@pytest.mark.parametrize("cache_type", [DynamicCache, PreallocatedCache])
def test_steps_equal_the_models_forward(model, padded, path, cache_type):
    model = model()
    V = model.config.vocab_size
    lengths = [7, 3, 5] if padded else [6, 6]
    L = max(lengths)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (len(lengths), L), generator=g)
    mask = torch.tensor([[0] * (L - n) + [1] * n for n in lengths])
    streaming = path != "aten"
    lean = LeanDecoder(model, streaming=streaming, fused=path == "fused")
    tol = 1e-4 if path == "fused" else 1e-5  # fused: every layer's sums in another order (logits ~10 here)
    with torch.no_grad():
        caches = [cache_type(config=model.config) for _ in range(2)]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        for c in caches:
            model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=c, use_cache=True)
        for _ in range(6):
            nxt = torch.randint(3, V, (len(lengths), 1), generator=g)
            mask = torch.cat([mask, mask.new_ones(len(lengths), 1)], 1)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
            with streaming_linears(model) if streaming else torch.enable_grad():
                want = model(input_ids=nxt, attention_mask=mask, position_ids=pos, cache=caches[0],
                             use_cache=True).logits[:, -1]
            got = lean.logits(nxt, mask, pos, caches[1])
            if streaming:  # the residual path: the model's last MLP block, norm and head applied to it
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            else:
                assert torch.equal(got, want)  # the same ATen ops in the same order
    for a, b in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=tol, atol=tol)
        torch.testing.assert_close(a.values, b.values, rtol=tol, atol=tol)


def test_dmoe_decodes_through_it_as_through_the_models_forward(llama_dir, tmp_path):
    base = load_base(llama_dir)
    bank = random_bank(base, tmp_path / "bank")
    fast = DMoE(base, bank, tau=0.5)
    slow = DMoE(base, bank, tau=0.5, lean=False)
    assert fast._lean is not None and slow._lean is None
    for tau in (0.5, math.inf):  # with triggers (experts active in the last MLP) and without
        a = fast.generate(QUESTIONS[:3], 12, tau=tau, share_prefix=0)
        b = slow.generate(QUESTIONS[:3], 12, tau=tau, share_prefix=0)
        assert [x.tokens for x in a] == [x.tokens for x in b]
        assert [[t.experts for t in x.triggers] for x in a] == [[t.experts for t in x.triggers] for x in b]
        torch.testing.assert_close(torch.tensor([e for x in a for e in x.entropies]),
                                   torch.tensor([e for x in b for e in x.entropies]), rtol=1e-4, atol=1e-4)
    assert any(x.triggers for x in fast.generate(QUESTIONS[:3], 12, tau=0.5))  # the check above had triggers


def test_bad_input_names_the_argument():
    gpt2 = tiny_model("gpt2")
    with pytest.raises(ValueError, match=r"LeanDecoder: model_type 'gpt2' is not supported; supported: \['llama'\]"):
        LeanDecoder(gpt2)
    model = llama(2)
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match=r"LeanDecoder: the model's attention implementation must be 'sdpa', got 'eager'"):
        LeanDecoder(model)
    model = llama(2)
    lean = LeanDecoder(model)
    cache = DynamicCache(config=model.config)
    with pytest.raises(ValueError, match=r"LeanDecoder: `ids` must be \[R, 1\] \(one new token per sequence\), "
                                         r"got \(1, 2\)"):
        lean.logits(torch.tensor([[4, 5]]), torch.ones(1, 2, dtype=torch.long), torch.tensor([[0, 1]]), cache)
    with pytest.raises(ValueError, match=r"LeanDecoder: an attention mask over 3 positions for a cache of 1"):
        lean.logits(torch.tensor([[4]]), torch.tensor([[0, 1, 1]]), torch.tensor([[0]]), cache)


class Doubled(torch.nn.Module):
    """A wrapper around a projection (as a LoRA layer is): the lean loop must call it as a module."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2.0 * self.inner(x)


@pytest.mark.parametrize("wrapped", ["q_proj", "down_proj"])
def test_a_layer_with_a_wrapper_takes_the_aten_path_and_the_others_stay_fused(wrapped, monkeypatch):
    model = llama(2)
    layer = model.model.layers[1]
    parent = layer.self_attn if wrapped == "q_proj" else layer.mlp
    lean = LeanDecoder(model)
    setattr(parent, wrapped, Doubled(getattr(parent, wrapped)))  # attached after the decoder was built: seen
    fused = []
    real = LeanDecoder._fused_layer
    monkeypatch.setattr(LeanDecoder, "_fused_layer", staticmethod(lambda *a, **k: fused.append(1) or real(*a, **k)))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        caches = [DynamicCache(config=model.config) for _ in range(2)]
        for c in caches:
            model(input_ids=ids, cache=c, use_cache=True)
        mask, pos, nxt = torch.ones(1, 5, dtype=torch.long), torch.tensor([[4]]), torch.tensor([[9]])
        with streaming_linears(model):
            want = model(input_ids=nxt, attention_mask=mask, position_ids=pos, cache=caches[0],
                         use_cache=True).logits[:, -1]
        got = lean.logits(nxt, mask, pos, caches[1])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(fused) == 2  # layers 0 and 2 of 3
    unwrapped = llama(2)  # the wrapper counts: without it the logits differ
    with torch.no_grad():
        c = DynamicCache(config=unwrapped.config)
        unwrapped(input_ids=ids, cache=c, use_cache=True)
        assert not torch.allclose(LeanDecoder(unwrapped).logits(nxt, mask, pos, c), got, atol=1e-2)
