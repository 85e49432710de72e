"""A decoder-only transformer LM whose FFNs are MoE layers.

RMSNorm, rotary attention through `scaled_dot_product_attention`, pre-norm residual
blocks. Every `moe_every`-th block uses an MoE FFN, the others a dense MLP.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .experts import ACTIVATIONS, MLP, GroupedExperts, init_std_for_output
from .gates import GATES, build_gate
from .layer import MoELayer


@dataclass
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    d_ff: int = 256  # hidden size of each routed expert
    dense_d_ff: int | None = None  # hidden size of dense FFNs and shared experts (default: d_ff * top_k)
    num_experts: int = 8
    top_k: int = 2
    moe_every: int = 1  # block i is MoE when (i + 1) % moe_every == 0; 0 makes a dense model
    shared_experts: int = 0
    activation: str = "swiglu"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    gate: dict = field(default_factory=lambda: {"name": "topk"})
    experts_impl: str = "torch"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Reject impossible shapes with a message that names the fix."""
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "d_ff", "num_experts", "top_k"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, f"model.{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.d_model % self.n_heads == 0, f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; pick n_heads that divides d_model")
        need((self.d_model // self.n_heads) % 2 == 0, f"head size d_model/n_heads={self.d_model // self.n_heads} must be even for rotary embeddings")
        need(self.top_k <= self.num_experts, f"model.top_k={self.top_k} is larger than model.num_experts={self.num_experts}; set top_k <= num_experts")
        need(self.moe_every >= 0, f"model.moe_every must be >= 0 (0 = dense model), got {self.moe_every}")
        need(self.shared_experts >= 0, f"model.shared_experts must be >= 0, got {self.shared_experts}")
        need(self.activation in ACTIVATIONS, f"model.activation={self.activation!r} is unknown; choose one of {', '.join(ACTIVATIONS)}")
        gate_name = self.gate.get("name") if isinstance(self.gate, dict) else None
        need(gate_name in GATES, f"gate={gate_name!r} is unknown; known gates: {', '.join(sorted(GATES))}")

    def is_moe_block(self, i: int) -> bool:
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0

    def to_dict(self) -> dict:
        return asdict(self)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x_BHSd: torch.Tensor) -> torch.Tensor:
        S = x_BHSd.shape[-2]
        cos, sin = self.cos[:S].to(x_BHSd.dtype), self.sin[:S].to(x_BHSd.dtype)
        x1, x2 = x_BHSd[..., 0::2], x_BHSd[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rotary = Rotary(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(self.rotary(q), self.rotary(k), v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        h = self.ffn_norm(x)
        return x + (self.ffn(h, token_ids) if isinstance(self.ffn, MoELayer) else self.ffn(h))


def build_moe_layer(cfg: ModelConfig) -> MoELayer:
    gate_opts = {k: v for k, v in cfg.gate.items() if k != "name"}
    gate = build_gate(cfg.gate["name"], cfg.d_model, cfg.num_experts, cfg.top_k, **gate_opts)
    experts = GroupedExperts(cfg.num_experts, cfg.d_model, cfg.d_ff, cfg.activation, impl=cfg.experts_impl)
    dense_d_ff = cfg.dense_d_ff or cfg.d_ff * cfg.top_k
    shared = MLP(cfg.d_model, dense_d_ff * cfg.shared_experts, cfg.activation) if cfg.shared_experts else None
    return MoELayer(gate, experts, shared)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        dense_d_ff = cfg.dense_d_ff or cfg.d_ff * cfg.top_k
        self.blocks = nn.ModuleList(
            Block(cfg, build_moe_layer(cfg) if cfg.is_moe_block(i) else MLP(cfg.d_model, dense_d_ff, cfg.activation))
            for i in range(cfg.n_layers)
        )
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std, out_std = self.cfg.init_std, init_std_for_output(self.cfg.n_layers, self.cfg.init_std)
        for name, p in self.named_parameters():
            if p.dim() < 2 or ".gate." in name:
                continue  # norms keep ones; gates initialise themselves
            is_output = name.endswith(("out.weight", "w2.weight", "w2_EFD"))
            nn.init.normal_(p, std=out_std if is_output else std)

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        if tokens_BS.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens_BS.shape[1]} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(tokens_BS)
        for block in self.blocks:
            x = block(x, tokens_BS)
        return self.lm_head(self.norm(x))

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' auxiliary losses from the last forward."""
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def num_params(self, active_only: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if not active_only:
            return total
        for m in self.moe_layers():
            expert_params = sum(p.numel() for p in m.experts.parameters())
            total -= expert_params - expert_params * self.cfg.top_k // self.cfg.num_experts
        return total
