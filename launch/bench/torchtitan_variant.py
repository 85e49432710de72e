"""The torchtitan variant of `moeflow bench train`: torchtitan's own MoE model (its Qwen3 model class,
token-choice top-k with grouped_mm experts, expert outputs weighted by the gate as its Qwen3 flavours
do) at the bench's shape, in the plain timed loop the hf variant uses, set up as torchtitan's trainer
sets up one GPU: fp32 weights and AdamW moments under bf16 autocast, the gradient clipped at 1.0 in one
foreach pass, its own cross-entropy. Compiled, it goes through torchtitan's own `apply_compile` (each
block, the MoE's parts one by one) and its loss is compiled too, as its trainer does.

What differs from the moeflow rows is written in the row (`differences`): always no auxiliary
load-balancing loss (torchtitan balances with an expert bias that its trainer updates; the plain loop
has no such hook, so the bias stays off) and, for the OLMoE-like preset, q/k norms per head where
moeflow normalises the whole projection (same FLOPs to the thousandth); and any moeflow-only setting
among the overrides (master weights, bf16 moments, precision, clipping, activation checkpointing)."""

from __future__ import annotations

from .plain_loop import time_plain_loop


def qwen3_args(cfg, seq_len: int, grouped_mm: bool):
    """torchtitan's Qwen3ModelArgs for moeflow's ModelConfig, or a ConfigError-worthy reason (str)
    when torchtitan's model cannot express the shape."""
    from torchtitan.models.moe import MoEArgs
    from torchtitan.models.qwen3.model.args import Qwen3ModelArgs

    gate = dict(cfg.gate)
    unsupported = {  # what torchtitan's model builds, for each setting moeflow could set otherwise
        "activation": (cfg.activation, "swiglu"),
        "moe_every": (cfg.moe_every, 1),
        "shared_experts": (cfg.shared_experts, 0),
        "attn_bias": (cfg.attn_bias, False),
        "rope_scaling": (cfg.rope_scaling, None),
        "gate": (gate.get("name"), "topk"),
        "gate.score_func": (gate.get("score_func"), "softmax"),
        "gate.topk_before_softmax": (gate.get("topk_before_softmax"), False),
        "gate.dropless": (gate.get("dropless"), True),
        "gate.noise_std": (gate.get("noise_std"), 0.0),
        "gate.jitter_eps": (gate.get("jitter_eps"), 0.0),
        "gate.n_groups": (gate.get("n_groups"), None),
        "gate.bias_update_rate": (gate.get("bias_update_rate"), 0.0),
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
            score_before_experts=False,  # as torchtitan's Qwen3 flavours, and moeflow: weight the outputs
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


# moeflow settings the torchtitan row does not take: it runs torchtitan's one-GPU defaults instead
MOEFLOW_ONLY = ("optim.", "trainer.precision", "trainer.activation_checkpointing", "experts.")


def differences(cfg, overrides: list[str]) -> list[str]:
    """What the torchtitan row does otherwise than the moeflow rows of the same run."""
    out = ["no auxiliary load-balancing loss (torchtitan's expert bias is off: its trainer's hook updates it)"]
    if cfg.qk_norm and cfg.qk_norm_scope == "proj":
        out.append("q/k norms per head (moeflow: over the whole projection)")
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    ignored = [o for o, k in zip(overrides, keys, strict=True) if k.startswith(MOEFLOW_ONLY)]
    if ignored:
        out.append(
            "moeflow rows only: " + " ".join(ignored) + " (torchtitan: fp32 weights and AdamW moments, bf16 autocast)"
        )
    return out


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

    import torch
    from torchtitan.components.loss import cross_entropy_loss

    loss_fn = cross_entropy_loss  # a sum: torchtitan's trainer divides by the tokens
    scalar_outputs = torch._dynamo.config.capture_scalar_outputs  # apply_compile sets it process-wide
    try:
        model = build(cfg, args.seq_len, device)  # its fp32 weights: the first place it may not fit
        if isinstance(model, str):
            return {"variant": name, "skipped": model}
        if compiled:
            from torchtitan.config.job_config import Compile
            from torchtitan.models.llama4.infra.parallelize import apply_compile

            apply_compile(model, Compile(enable=True), ep_enabled=False)
            loss_fn = torch.compile(loss_fn)  # as torchtitan's build_cross_entropy_loss with compile on
        timed = time_plain_loop(
            lambda m, tokens: m(tokens),
            model,
            cfg.vocab_size,
            args,
            device,
            max_norm=1.0,
            loss_of=lambda logits, labels: loss_fn(logits, labels) / labels.numel(),
        )
    except torch.OutOfMemoryError as e:  # this row does not fit: said in it, and the rows measured so far are kept
        first_line = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
        return {"variant": name, "skipped": f"out of memory: {first_line}"}
    finally:
        torch._dynamo.config.capture_scalar_outputs = scalar_outputs
    return {
        "variant": name,
        "torchtitan_version": version("torchtitan"),
        **timed,
        "torchtitan_params": sum(p.numel() for p in model.parameters()),
        "differences": differences(cfg, list(args.override)),
    }
