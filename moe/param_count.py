"""Parameter counts of a `ModelConfig` from its shape alone (no model built, no torch).

What a 30B-parameter preset costs is known before anything is allocated; the trainer's
own count of the built model (`Transformer.num_params`) must agree (tested).
"""

from __future__ import annotations

from .config import ModelConfig


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token): active counts top_k of the routed experts of each MoE layer."""
    d, hd, H, KV = cfg.d_model, cfg.head_size, cfg.n_heads, cfg.kv_heads
    mats = 3 if cfg.activation == "swiglu" else 2
    attn = d * (H + 2 * KV) * hd + H * hd * d + 2 * d  # qkv, out, the two block norms
    attn += (H + 2 * KV) * hd if cfg.attn_bias else 0
    if cfg.qk_norm:
        attn += (H + KV) * hd if cfg.qk_norm_scope == "proj" else 2 * hd
    dense_ff = cfg.dense_d_ff or cfg.d_ff * cfg.top_k
    dense_ffn = mats * d * dense_ff
    expert = mats * d * cfg.d_ff
    shared = mats * d * cfg.shared_hidden + (d if cfg.shared_expert_gate else 0)
    router = d * cfg.num_experts
    total = active = 0
    for i in range(cfg.n_layers):
        if cfg.is_moe_block(i):
            total += attn + router + shared + cfg.num_experts * expert
            active += attn + router + shared + cfg.top_k * expert
        else:
            total += attn + dense_ffn
            active += attn + dense_ffn
    embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + d  # embedding, head, final norm
    return total + embed, active + embed
