"""Model presets of real MoE shapes: the counts they claim, the formula, and the built model agree."""

from __future__ import annotations

import pytest
import torch

from helpers.config import compose_cfg
from moeflow.launch.config import model_config
from moeflow.moe.config import ModelConfig
from moeflow.moe.model import Transformer
from moeflow.moe.param_count import param_counts

# published totals / active per token (model cards)
PRESETS = {"olmoe_1b_7b": (6.92e9, 1.28e9), "qwen3_30b_a3b": (30.5e9, 3.3e9), "mixtral_8x7b": (46.7e9, 12.9e9)}

SMALL = [
    {},
    {"n_kv_heads": 2, "head_dim": 24, "attn_bias": True, "tie_embeddings": True},
    {"qk_norm": True, "qk_norm_scope": "proj", "top_k": 3},
    {
        "qk_norm": True,
        "moe_every": 2,
        "dense_d_ff": 40,
        "shared_experts": 1,
        "shared_d_ff": 24,
        "shared_expert_gate": True,
    },
    {"activation": "gelu", "shared_experts": 2, "moe_every": 3},
]


@pytest.mark.parametrize("options", SMALL, ids=[",".join(o) or "default" for o in SMALL])
def test_formula_counts_the_built_model(options):
    cfg = ModelConfig(
        **{
            "vocab_size": 50,
            "d_model": 32,
            "n_layers": 3,
            "n_heads": 4,
            "d_ff": 16,
            "num_experts": 6,
            "top_k": 2,
            **options,
        }
    )
    model = Transformer(cfg)
    assert param_counts(cfg) == (model.num_params(), model.num_params(active_only=True))


@pytest.mark.parametrize("name", PRESETS)
def test_presets_have_their_published_counts(name):
    cfg = model_config(compose_cfg(f"model={name}", "trainer.device=cpu"))
    with torch.device("meta"):
        model = Transformer(cfg)
    total, active = param_counts(cfg)
    assert (total, active) == (model.num_params(), model.num_params(active_only=True))
    want_total, want_active = PRESETS[name]
    assert total == pytest.approx(want_total, rel=0.01) and active == pytest.approx(want_active, rel=0.02)
