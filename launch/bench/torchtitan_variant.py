"""The torchtitan variant of `moeflow bench train`: torchtitan's own MoE model (its Qwen3 model class,
token-choice top-k with grouped_mm experts) at the bench's shape, in the plain timed loop the hf
variant uses, with the gradient clipped as torchtitan's trainer does (max_norm 1.0, one foreach pass).
Compiled, it goes through torchtitan's own `apply_compile` (each block, the MoE's parts one by one).

Differences from moeflow's model that remain, stated in the row: no auxiliary load-balancing loss
(torchtitan balances with an expert bias that its trainer updates; the plain loop has no such hook,
so the bias stays off), and q/k norms per head where the OLMoE-like preset normalises the whole
projection (d_model weights instead of head_dim: same FLOPs to the thousandth)."""

from __future__ import annotations

from .plain_loop import time_plain_loop


def qwen3_args(cfg, seq_len: int, grouped_mm: bool):
    """torchtitan's Qwen3ModelArgs for moeflow's ModelConfig, or a ConfigError-worthy reason (str)
    when torchtitan's model cannot express the shape."""
    from torchtitan.models.moe import MoEArgs
    from torchtitan.models.qwen3.model.args import Qwen3ModelArgs

    gate = cfg.gate
    unsupported = {
        "activation": (cfg.activation, "swiglu"),
        "moe_every": (cfg.moe_every, 1),
        "shared_experts": (cfg.shared_experts, 0),
        "attn_bias": (cfg.attn_bias, False),
        "gate.score_func": (gate["score_func"], "softmax"),
        "gate.topk_before_softmax": (gate["topk_before_softmax"], False),
    }
    for key, (got, want) in unsupported.items():
        if got != want:
            return f"torchtitan's Qwen3 MoE has no {key}={got} (it builds {key}={want})"
    head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
    return Qwen3ModelArgs(
        dim=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads or cfg.n_heads,
        vocab_size=cfg.vocab_size,
        head_dim=head_dim,
        norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        qk_norm=cfg.qk_norm,
        max_seq_len=seq_len,
        enable_weight_tying=cfg.tie_embeddings,
        moe_enabled=True,
        moe_inter_dim=cfg.d_ff,
        moe_args=MoEArgs(
            num_experts=cfg.num_experts,
            num_shared_experts=0,
            score_func="softmax",
            route_norm=bool(gate["renormalize"]),
            top_k=cfg.top_k,
            use_grouped_mm=grouped_mm,
            load_balance_coeff=None,
        ),
    )


def build(cfg, seq_len: int, device):
    """torchtitan's model on `device`, initialised by its own init_weights; or the reason it can't be."""
    import torch
    from torchtitan.models.qwen3.model.model import Qwen3Model

    margs = qwen3_args(cfg, seq_len, grouped_mm=device.type == "cuda")
    if isinstance(margs, str):
        return margs
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen3Model(margs)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    return model


def torchtitan_variant(cfg, args, device, compiled: bool) -> dict:
    """One row: torchtitan's model of cfg's shape, eager or compiled with torchtitan's apply_compile (the
    caller adds the shape's FLOPs and parameter counts, as for its other rows)."""
    name = "torchtitan-compiled" if compiled else "torchtitan"
    try:
        import torchtitan  # noqa: F401
        from torchtitan.models.qwen3.model.model import Qwen3Model  # noqa: F401
    except ImportError as e:
        return {"variant": name, "skipped": f"torchtitan is not importable ({e}); pip install moeflow[torchtitan]"}
    if device.type != "cuda":  # torchtitan's router counts tokens with torch.histc on integers: CUDA only
        return {"variant": name, "skipped": "torchtitan's MoE runs on CUDA only (its router's histc on integers)"}
    from importlib.metadata import version

    model = build(cfg, args.seq_len, device)
    if isinstance(model, str):
        return {"variant": name, "skipped": model}
    if compiled:
        from torchtitan.config.job_config import Compile
        from torchtitan.models.llama4.infra.parallelize import apply_compile

        apply_compile(model, Compile(enable=True), ep_enabled=False)
    timed = time_plain_loop(lambda m, tokens: m(tokens), model, cfg.vocab_size, args, device, max_norm=1.0)
    return {
        "variant": name,
        "torchtitan_version": version("torchtitan"),
        **timed,
        "torchtitan_params": sum(p.numel() for p in model.parameters()),
    }
