"""Training throughput of DoE vs the dense "Base" vs the softmax top-k MoE at equal hidden size, and
the analytic FLOPs overhead of one DoE layer (and how it scales with d)."""
from __future__ import annotations

import torch

from benchmarks.common import interleaved_medians
from doe_ext.models import DoEConfig, DoEForCausalLM

SHAPE = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1376, num_topics=128,
             topic_dim=64, latent_dim=128, vocab_size=8192, max_position_embeddings=1024)
SEQ = 512
VARIANTS = {"doe": {}, "dense": {"knowledge": False},
            "moe_top2": {"router": "moe_topk", "num_experts": 8, "num_experts_per_tok": 2}}


def layer_flops(cfg: DoEConfig, seq: int) -> dict[str, float]:
    """Forward FLOPs per token of one layer (a multiply-add = 2): the dense layer, and what DoE adds."""
    d, hd, H, Hkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    K, dz = cfg.num_topics, cfg.latent_dim
    attn = 2 * d * H * hd + 2 * 2 * d * Hkv * hd + 2 * H * hd * d + 2 * 2 * (seq / 2) * H * hd  # causal: ~seq/2 keys
    dense = attn + 3 * 2 * d * cfg.intermediate_size
    sig = {"q": H, "k": Hkv, "v": Hkv}.get(cfg.signal_source, 0) * hd
    doe = (2 * d * d + 2 * 2 * K * d  # knowledge attention: W_q, scores, values (eq. 1-2)
           + 2 * sig * d  # W_s on the signal
           + 2 * 2 * d * dz + 2 * dz * K  # VAE encoder (mu, logvar) + gate
           + 2 * K * d)  # composed expert G·Z
    return {"dense": dense, "doe_extra": doe, "overhead": doe / dense}


def run(device: str) -> list[dict]:
    if device != "cpu":
        return []
    torch.manual_seed(0)
    ids = torch.randint(3, SHAPE["vocab_size"], (1, SEQ))
    topics = torch.randint(0, SHAPE["num_topics"], (1, SEQ))
    steps = {}
    for name, extra in VARIANTS.items():
        model = DoEForCausalLM(DoEConfig(**SHAPE, **extra))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            model(ids, topic_ids=topics, labels=ids).loss.backward()
            opt.step()
        steps[name] = step
    t = interleaved_medians(steps, device, pairs=5, warmup=1)
    cfg = DoEConfig(**SHAPE)
    flops = layer_flops(cfg, SEQ)
    scaling = {d: round(layer_flops(DoEConfig(**{**SHAPE, "hidden_size": d, "intermediate_size": int(2.6875 * d),
                                                 "num_attention_heads": d // 64}), 4096)["overhead"], 4)
               for d in (512, 1024, 2048, 4096)}
    return [{"bench": "model train step", "shape": f"d=512 L=4 K=128 seq={SEQ} V=8192", "dtype": "float32",
             "device": device, "ms": {k: round(v * 1e3, 1) for k, v in t.items()},
             "tokens_per_s": {k: round(SEQ / v, 1) for k, v in t.items()},
             "speedup": {"doe_vs_dense_time": round(t["doe"] / t["dense"], 3),
                         "doe_vs_moe_time": round(t["doe"] / t["moe_top2"], 3)},
             "flops_per_token_layer": {k: round(v) if k != "overhead" else round(v, 4) for k, v in flops.items()},
             "analytic_overhead_by_d_seq4096": scaling}]
