"""PreallocatedCache (DMoE's decoding cache) against transformers' DynamicCache: the same states after
every cache operation DMoE uses, a step written in place (no copy of the cache), finished rows that
leave by moving one row each, and DMoE's generations equal to those with DynamicCache."""
import math

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

import doe_ext.dmoe.model as dmoe_model
from dmoe_testing import QUESTIONS, random_bank
from doe_ext.dmoe import DMoE
from doe_ext.dmoe.cache import PreallocatedCache, PreallocatedLayer, fill_from_end


def states(B=4, H=2, T=3, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)


def assert_same(ours: PreallocatedLayer, theirs: DynamicLayer):
    assert ours.get_seq_length() == theirs.get_seq_length()
    assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)


def test_layer_equals_dynamic_layer_through_every_operation():
    ours, theirs = PreallocatedLayer(chunk=4), DynamicLayer()
    for layer in (ours, theirs):
        out = layer.update(*states(T=6))  # a prefill
    assert torch.equal(out[0], ours.keys)
    assert_same(ours, theirs)
    for step in range(7):  # decoding steps, past the chunk: the buffer grows
        got, want = ours.update(*states(T=1, seed=step + 1)), theirs.update(*states(T=1, seed=step + 1))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert_same(ours, theirs)
    for layer in (ours, theirs):
        layer.crop(-3)
    assert_same(ours, theirs)
    for sel in ([0, 1, 3], [0, 2], [1, 0]):  # ascending, ascending, reordered (transformers' index copy)
        for layer in (ours, theirs):
            layer.batch_select_indices(torch.tensor(sel))
            layer.update(*states(B=len(sel), T=1, seed=10 + len(sel)))
        assert_same(ours, theirs)
    for layer in (ours, theirs):
        layer.batch_repeat_interleave(3)
        layer.update(*states(B=6, T=2, seed=20))
    assert_same(ours, theirs)


def test_a_step_writes_in_place_and_growth_keeps_room_for_a_chunk():
    layer = PreallocatedLayer(chunk=8)
    layer.update(*states(T=5))
    buffer = layer.keys.untyped_storage().data_ptr()
    for step in range(8):
        layer.update(*states(T=1, seed=step))
        assert layer.keys.untyped_storage().data_ptr() == buffer  # no copy of the cache
    layer.update(*states(T=1, seed=9))  # the 14th position: past 5 + 8, one copy into a larger buffer
    assert layer.keys.untyped_storage().data_ptr() != buffer
    assert layer.get_seq_length() == 14 and layer._k.shape[-2] == 14 + 8


def test_finished_rows_leave_moving_one_row_each():
    layer = PreallocatedLayer()
    layer.update(*states(B=6, T=4))
    before = layer.keys.clone()
    order = fill_from_end(6, [0, 2, 3, 5])  # rows 1 and 4 finished
    assert order == [0, 5, 2, 3]  # row 5 fills the hole at 1; rows 0, 2, 3 stay where they are
    buffer = layer.keys.untyped_storage().data_ptr()
    layer.batch_select_indices(torch.tensor(order))
    assert layer.keys.untyped_storage().data_ptr() == buffer
    assert torch.equal(layer.keys, before[order])


@pytest.mark.parametrize("rows,kept,order", [(3, [0, 1, 2], [0, 1, 2]), (4, [3], [3]), (4, [], []),
                                             (5, [1, 4], [4, 1]), (7, [0, 6, 2, 5], [0, 5, 2, 6])])
def test_fill_from_end(rows, kept, order):
    assert fill_from_end(rows, kept) == order
    assert sorted(order) == sorted(kept) and all(j >= i for i, j in enumerate(order))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="`kept` must be distinct rows of 0..3, got \\[1, 1\\]"):
        fill_from_end(4, [1, 1])
    with pytest.raises(ValueError, match="`kept` must be distinct rows of 0..3, got \\[0, 4\\]"):
        fill_from_end(4, [4, 0])
    with pytest.raises(ValueError, match="`chunk` must be >= 1, got 0"):
        PreallocatedLayer(chunk=0)
    with pytest.raises(ValueError, match="`tokens_to_remove` is a negative count"):
        PreallocatedLayer().crop(2)
    layer = PreallocatedLayer()
    layer.update(*states(B=2))
    with pytest.raises(ValueError, match=r"\(3, 2\) \(batch, heads\) of new states for a cache of \(2, 2\)"):
        layer.update(*states(B=3, T=300))


def test_cache_keeps_sliding_layers_as_transformers_makes_them(sliding_base):
    config = sliding_base.model.config
    ours, theirs = PreallocatedCache(config), DynamicCache(config=config)
    assert [type(a) is PreallocatedLayer for a in ours.layers] == [type(b) is DynamicLayer for b in theirs.layers]
    assert any(isinstance(a, PreallocatedLayer) for a in ours.layers)
    assert not all(isinstance(a, PreallocatedLayer) for a in ours.layers)


@pytest.mark.parametrize("tau", [math.inf, 0.0])
def test_dmoe_generations_equal_those_with_dynamic_cache(base, tmp_path, monkeypatch, tau):
    """Rows finishing at different steps (stop tokens) and triggers: the tokens and triggers of
    DynamicCache with ascending row selection, entropies to float rounding."""
    bank = random_bank(base, tmp_path / "bank")
    dmoe = DMoE(base, bank, top_k=2)
    free = dmoe.generate(QUESTIONS, max_new_tokens=10, tau=tau)
    for stop in ({t} for g in free for t in g.tokens):  # a stop token that ends the rows at different steps
        got = dmoe.generate(QUESTIONS, max_new_tokens=10, tau=tau, stop_tokens=stop)
        if len({len(g.tokens) for g in got}) > 2:
            break
    assert len({len(g.tokens) for g in got}) > 2, [g.tokens for g in free]
    monkeypatch.setattr(dmoe_model, "PreallocatedCache", lambda config: DynamicCache(config=config))
    monkeypatch.setattr(dmoe_model, "fill_from_end", lambda rows, kept: list(kept))
    dmoe._kept_prefix = ([], None)
    want = dmoe.generate(QUESTIONS, max_new_tokens=10, tau=tau, stop_tokens=stop)
    for g, w in zip(got, want):
        assert g.tokens == w.tokens
        assert [(t.position, t.experts) for t in g.triggers] == [(t.position, t.experts) for t in w.triggers]
        assert g.entropies == pytest.approx(w.entropies, abs=1e-4)
