"""Decoding steps with the linear layers streamed (doe_ext.nn.streaming_linears, DMoE's default): the
same tokens, triggers and (to float rounding) entropies as ATen's GEMM, and the model left as it was."""
import math

import pytest
import torch
from torch import nn

from dmoe_testing import QUESTIONS, random_bank
from doe_ext.dmoe import DMoE
from doe_ext.nn import plain_linears, streaming_linears


def test_every_linear_layer_streams_inside_and_is_restored_after(base):
    model = base.model
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert plain_linears(model) == linears
    keys = list(model.state_dict())
    ids = base.tokenizer(QUESTIONS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = model(input_ids=ids[:, :1]).logits  # one token: every linear is a GEMV
        calls = []
        with streaming_linears(model) as n:
            assert n == len(linears)  # GPT-2's Conv1D projections are not nn.Linear: only its head streams
            with torch.autograd.profiler.profile() as prof:
                streamed = model(input_ids=ids[:, :1]).logits
            calls = [e for e in prof.function_events if e.name == "doe_ext::decode_linear"]
            with streaming_linears(model) as inner:  # nested: nothing left to switch
                assert inner == 0
            with streaming_linears(linears) as inner:  # a kept list of the layers, as DMoE passes it
                assert inner == 0
        assert len(calls) == len(linears)
    assert all("forward" not in vars(m) for m in linears)
    torch.testing.assert_close(streamed, plain, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # outside a block the layers compute as nn.Linear, bit for bit, under the same names
        torch.testing.assert_close(model(input_ids=ids[:, :1]).logits, plain, rtol=0, atol=0)
    assert list(model.state_dict()) == keys and plain_linears(model) == linears
    with torch.no_grad(), streaming_linears(linears) as n:
        assert n == len(linears)
        torch.testing.assert_close(model(input_ids=ids[:, :1]).logits, streamed)
    assert all("forward" not in vars(m) for m in linears)


def test_a_layer_with_its_own_forward_is_left_alone():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(4, 3), Scaled(3, 2))
    x = torch.randn(1, 4)
    with torch.no_grad(), streaming_linears(model) as n:
        assert n == 1
        torch.testing.assert_close(model(x), 2 * nn.functional.linear(nn.functional.linear(x, model[0].weight, model[0].bias),
                                                                     model[1].weight, model[1].bias))


@pytest.mark.parametrize("tau", [math.inf, 0.0])
def test_dmoe_streamed_equals_dmoe_on_aten(base, tmp_path, tau):
    """Every row count the streamed kernel takes (1 to 4 sequences, rows leaving as they finish), with
    and without triggers: the tokens and triggers of ATen's GEMM, entropies to rounding."""
    bank = random_bank(base, tmp_path / "bank")
    streamed, aten = DMoE(base, bank, top_k=2), DMoE(base, bank, top_k=2, streaming=False)
    assert streamed.streaming and not aten.streaming
    for prompts in (QUESTIONS[:1], QUESTIONS):
        got = streamed.generate(prompts, max_new_tokens=10, tau=tau)
        want = aten.generate(prompts, max_new_tokens=10, tau=tau)
        for g, w in zip(got, want):
            assert g.tokens == w.tokens
            assert [(t.position, t.experts) for t in g.triggers] == [(t.position, t.experts) for t in w.triggers]
            assert g.entropies == pytest.approx(w.entropies, abs=1e-4)


def test_each_thread_streams_its_own_layers():
    """Which layers stream is per-call state (a scope): a block in one thread leaves another thread's
    calls on ATen."""
    import threading

    layer = nn.Linear(8, 5)
    x = torch.randn(1, 8)
    seen = {}

    def other():
        with torch.autograd.profiler.profile() as prof:
            layer(x)
        seen["other"] = [e.name for e in prof.function_events if e.name == "doe_ext::decode_linear"]

    with torch.no_grad(), streaming_linears([layer]) as n:
        assert n == 1
        t = threading.Thread(target=other)
        t.start()
        t.join()
        with torch.autograd.profiler.profile() as prof:
            layer(x)
    assert seen["other"] == []
    assert [e.name for e in prof.function_events if e.name == "doe_ext::decode_linear"] == ["doe_ext::decode_linear"]
