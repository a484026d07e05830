"""doe_ext.analysis: gate activity by label, utilisation CV, per-block gradient norms, plots."""
from __future__ import annotations

import pytest
import torch

from doe_ext.analysis import (UtilizationTracker, block_gradient_norms, gate_activations_by_label, plot_curves,
                              plot_heatmap, topic_alignment,
                              plot_gate_heatmap)
from doe_ext.models import DoEForCausalLM
from test_doe_model import K, V, tiny


def _batches():
    g = torch.Generator().manual_seed(1)
    for domain in ("math", "code", "math"):
        ids = torch.randint(3, V, (2, 7), generator=g)
        yield {"input_ids": ids, "topic_ids": torch.randint(0, K, (2, 7), generator=g), "label": domain}


def test_gate_activations_by_label_agree_with_the_models_own_statistics():
    model = DoEForCausalLM(tiny()).eval()
    batches = list(_batches())
    acts = gate_activations_by_label(model, batches)
    assert set(acts) == {"math", "code"}
    assert acts["math"]["tokens"] == 2 * 14 and acts["code"]["tokens"] == 14
    code = batches[1]
    with torch.no_grad():
        aux = model(code["input_ids"], topic_ids=code["topic_ids"]).aux
    for layer, stats in enumerate(aux["layers"]):  # the forward's own sparsity, computed another way
        torch.testing.assert_close(acts["code"]["active"][layer].mean(), 1 - stats["sparsity"])
    assert acts["math"]["mean"].shape == (3, K) and (acts["math"]["mean"] >= 0).all()


def test_per_row_labels_and_padding():
    model = DoEForCausalLM(tiny()).eval()
    ids = torch.randint(3, V, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    acts = gate_activations_by_label(model, [{"input_ids": ids, "attention_mask": mask, "label": ["a", "b"]}])
    assert acts["a"]["tokens"] == 6 and acts["b"]["tokens"] == 4


def test_models_without_gates_are_refused():
    with pytest.raises(ValueError, match="no DoE knowledge path"):
        gate_activations_by_label(DoEForCausalLM(tiny(knowledge=False)), [])


def test_utilization_tracker_records_every_layer_every_step():
    model = DoEForCausalLM(tiny())
    tracker = UtilizationTracker()
    for batch in _batches():
        batch.pop("label")
        tracker.update(model(**batch).aux)
    assert tracker.history.shape == (3, 3)
    assert (tracker.history >= 0).all()


def test_block_gradient_norms_isolate_closed_blocks():
    model = DoEForCausalLM(tiny(blocks="ffn"))
    dead = 2
    for router in model.model.knowledge.routers.values():
        with torch.no_grad():
            router.gate.bias[dead] = -1e4
    batch = next(_batches())
    batch.pop("label")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    norms = block_gradient_norms(model)
    assert norms["block_ffn"].shape == (3, K)
    assert (norms["block_ffn"][:, dead] == 0).all()
    assert (norms["block_ffn"].sum(1) > 0).all()
    assert norms["knowledge_state"].shape == (K,) and (norms["knowledge_state"] > 0).any()


def test_moe_expert_gradient_norms_match_each_experts_parameters():
    model = DoEForCausalLM(tiny(router="moe_topk", num_experts=4, num_experts_per_tok=1))
    batch = next(_batches())
    batch.pop("label")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    norms = block_gradient_norms(model)["moe_experts"]
    assert norms.shape == (3, 4)
    for layer, row in zip(model.model.layers, norms):  # one expert at a time, from its own parameters
        for e, expert in enumerate(layer.ffn.experts):
            grads = [p.grad.flatten() for p in expert.parameters() if p.grad is not None]
            want = torch.cat(grads).norm() if grads else torch.tensor(0.0)
            torch.testing.assert_close(row[e], want)


def test_plots_are_written_as_png(tmp_path):
    model = DoEForCausalLM(tiny()).eval()
    acts = gate_activations_by_label(model, _batches())
    heat = plot_gate_heatmap(acts, tmp_path / "heat.png", layer=1)
    curves = plot_curves({"dense": [3.0, 2.5, 2.1], "doe": torch.tensor([3.0, 2.4, 2.0])}, tmp_path / "loss.png")
    for fig, name in ((heat, "heat.png"), (curves, "loss.png")):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    # the figures come back (a notebook shows them inline): one image + colour bar, two labelled lines
    assert len(heat.axes) == 2 and heat.axes[0].images[0].get_array().shape == (len(acts), acts[next(iter(acts))]["active"].shape[1])
    assert [ln.get_label() for ln in curves.axes[0].lines] == ["dense", "doe"]
    assert plot_curves({"x": [1.0, 2.0]}).axes[0].lines[0].get_ydata().tolist() == [1.0, 2.0]  # no path: nothing written


def test_topic_alignment_is_the_mean_theta_per_label():
    theta = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])
    got = topic_alignment(theta, ["law", "law", "music"])
    assert list(got) == ["law", "music"]
    torch.testing.assert_close(got["law"], torch.tensor([0.8, 0.2]))
    torch.testing.assert_close(got["music"], torch.tensor([0.2, 0.8]))
    fig = plot_heatmap(got, xlabel="topic")
    assert fig.axes[0].images[0].get_array().shape == (2, 2)
    with pytest.raises(ValueError, match="`theta` must be \\[documents, topics\\] with one row per label, got \\(3, 2\\) for 2"):
        topic_alignment(theta, ["law", "music"])
