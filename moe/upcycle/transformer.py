"""A dense moeflow `Transformer` -> a moeflow MoE `Transformer` (the checkpoint path)."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..experts import MLP
from ..gates import build_gate
from ..layer import MoELayer
from ..model import ModelConfig, Rotary, Transformer
from .dense import DenseFFN, fill_moe_layer
from .options import UpcycleError, UpcycleOptions


def dense_ffns(model: Transformer) -> list[DenseFFN]:
    """The dense FFN of every block: a dense MLP, or the single expert of a 1-expert MoE block."""
    out = []
    for i, block in enumerate(model.blocks):
        ffn = block.ffn
        if isinstance(ffn, MLP):
            out.append(DenseFFN.from_mlp(ffn))
        elif isinstance(ffn, MoELayer) and ffn.experts.num_experts == 1 and ffn.shared_expert is None:
            out.append(DenseFFN.from_expert(ffn.experts, 0))
        else:
            raise UpcycleError(
                f"block {i} is already a mixture of {ffn.experts.num_experts} experts; upcycle a dense checkpoint (model.num_experts=1 or moe_every=0)"
            )
    return out


def upcycled_config(dense: ModelConfig, d_ff: int, opts: UpcycleOptions) -> ModelConfig:
    if d_ff % opts.granularity:
        raise UpcycleError(
            f"granularity={opts.granularity} does not divide the MLP hidden size {d_ff}; pick a divisor of {d_ff}"
        )
    gate = {"name": opts.gate, **opts.gate_options}
    try:
        return replace(
            dense,
            num_experts=opts.total_experts,
            top_k=opts.active_experts,
            d_ff=d_ff // opts.granularity,
            dense_d_ff=d_ff,
            moe_every=opts.moe_every,
            shared_experts=1 if opts.shared_expert else 0,
            gate=gate,
        )
    except ValueError as e:
        raise UpcycleError(str(e)) from None


@torch.no_grad()
def upcycle_transformer(dense: Transformer, opts: UpcycleOptions) -> Transformer:
    """A new moeflow `Transformer` with MoE FFNs initialised from `dense` (left untouched)."""
    ffns = dense_ffns(dense)
    widths = {f.d_ff for f in ffns}
    if len(widths) != 1:
        raise UpcycleError(f"the dense blocks have different MLP widths {sorted(widths)}; upcycle needs one width")
    if any(f.activation != dense.cfg.activation for f in ffns):
        raise UpcycleError("the dense MLPs' activation does not match model.activation")
    cfg = upcycled_config(dense.cfg, widths.pop(), opts)
    gen = torch.Generator().manual_seed(opts.seed)
    param = next(dense.parameters())
    with torch.device("meta"):  # no random init of billions of expert weights: every tensor is written below
        moe = Transformer(cfg)
    moe = moe.to_empty(device=param.device).to(param.dtype)
    state = {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    unwritten = [k for k in missing if ".ffn." not in k and not (cfg.tie_embeddings and k == "lm_head.weight")]
    if unexpected or unwritten:
        raise UpcycleError(
            f"dense and upcycled models differ outside the FFNs (unexpected {unexpected[:3]}, missing {unwritten[:3]})"
        )
    gate_opts = {k: v for k, v in cfg.gate.items() if k != "name"}
    for block, ffn in zip(moe.blocks, ffns):
        block.attn.rotary = Rotary(cfg.head_size, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling).to(param.device)
        if isinstance(block.ffn, MoELayer):
            block.ffn.gate = build_gate(cfg.gate["name"], cfg.d_model, cfg.num_experts, cfg.top_k, **gate_opts).to(
                param.device, param.dtype
            )
            fill_moe_layer(block.ffn, ffn, opts, gen)
        else:
            block.ffn.w1.weight.copy_(ffn.w1_FD)
            if block.ffn.w3 is not None:
                block.ffn.w3.weight.copy_(ffn.w3_FD)
            block.ffn.w2.weight.copy_(ffn.w2_DF)
    if cfg.tie_embeddings:
        moe.lm_head.weight = moe.embed.weight
    return moe
