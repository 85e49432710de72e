"""Tiny random Hugging Face dense models saved to folders, for the upcycling tests."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 100


def make_hf(kind: str, folder: Path, vocab: int = VOCAB, seed: int = 0, **overrides):
    """A tiny random `kind` model (llama, mistral, qwen2, qwen3, gpt2), saved with save_pretrained."""
    import transformers as T

    torch.manual_seed(seed)
    base = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
    )
    if kind == "gpt2":
        cfg = T.GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            vocab_size=vocab,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            **overrides,
        )
        model = T.GPT2LMHeadModel(cfg)
    else:
        cls_cfg, cls_model = {
            "llama": (T.LlamaConfig, T.LlamaForCausalLM),
            "mistral": (T.MistralConfig, T.MistralForCausalLM),
            "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
            "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM),
        }[kind]
        model = cls_model(cls_cfg(**{**base, **overrides}))
    with torch.no_grad():  # non-trivial norms and biases, so that a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    model.save_pretrained(str(folder))
    return model


def tokens(batch: int = 2, seq: int = 16, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """float32 logits equal to rtol, relative to the logit scale (elementwise rtol breaks near 0)."""
    scale = want.abs().max().item()
    diff = (got.double() - want.double()).abs().max().item()
    assert diff <= rtol * scale, f"max |diff| {diff:.3e} > {rtol:g} * max |logit| {scale:.3e}"


MOE_KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def make_hf_moe(kind: str, folder: Path, vocab: int = VOCAB, seed: int = 0, **overrides):
    """A tiny random Hugging Face MoE model of `kind` (MOE_KINDS), saved with save_pretrained.

    Qwen2-MoE gets a gated shared expert, a dense layer (decoder_sparse_step=2) and
    renormalised weights; the others keep their architecture's defaults."""
    import transformers as T

    torch.manual_seed(seed)
    base = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
        num_experts_per_tok=2,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=None,
    )
    cls_cfg, cls_model, extra = {
        "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(num_local_experts=4)),
        "qwen2_moe": (
            T.Qwen2MoeConfig,
            T.Qwen2MoeForCausalLM,
            dict(
                num_experts=4,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=24,
                decoder_sparse_step=2,
                norm_topk_prob=True,
            ),
        ),
        "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, dict(num_experts=4, moe_intermediate_size=16)),
        "olmoe": (T.OlmoeConfig, T.OlmoeForCausalLM, dict(num_experts=4)),
    }[kind]
    model = cls_model(cls_cfg(**{**base, **extra, **overrides}))
    with torch.no_grad():  # non-trivial norms, biases and routers, so that a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)
    model.eval()
    model.save_pretrained(str(folder))
    return model
