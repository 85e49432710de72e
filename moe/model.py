"""A decoder-only transformer LM whose FFNs are MoE layers.

RMSNorm, rotary attention through `scaled_dot_product_attention`, pre-norm residual
blocks. Every `moe_every`-th block uses an MoE FFN, the others a dense MLP.

The optional attention features (grouped-query heads, an explicit head size, q/k/v
biases, per-head q/k RMSNorm, rope scaling) default to off; they let the model
represent the Llama family (Llama, Mistral, Qwen2, Qwen3) exactly, so that upcycled
Hugging Face checkpoints train here (`moeflow.moe.hf_convert`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import ModelConfig
from .errors import DataError
from .experts import MLP, GroupedExperts, SharedExpert
from .gates import build_gate
from .init import init_weights
from .layer import MoELayer, moe_aux_loss, moe_layers


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Rotary frequencies (float64), with Hugging Face's `linear` and `llama3` scalings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":  # smooth interpolation between scaled low and unscaled high frequencies
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen) - lo) / (hi - lo)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        is_mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        return torch.where(is_mid, mid, out)
    return inv_freq


class Rotary(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta, self.scaling = head_dim, max_seq_len, theta, scaling
        cos, sin = self._tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self):
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64, device=inv_freq.device), inv_freq)
        return angles.cos().float(), angles.sin().float()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the tables in place (a materialised meta-device model has garbage in them)."""
        with torch.device("cpu"):
            cos, sin = self._tables()
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, x_BHSd: torch.Tensor, start: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate by positions start..start+S-1, or by the given `positions` (a sequence shard's true ones)."""
        S = x_BHSd.shape[-2]
        cos, sin = (
            (self.cos[start : start + S], self.sin[start : start + S])
            if positions is None
            else (
                self.cos[positions],
                self.sin[positions],
            )
        )
        cos, sin = cos.to(x_BHSd.dtype), sin.to(x_BHSd.dtype)
        x1, x2 = x_BHSd[..., 0::2], x_BHSd[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def norm_like_input(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm of autocast's bf16 q/k with the fp32 weight, in the input's dtype: torch's fused kernel
    needs one dtype, and a bf16 input with an fp32 weight fell back to several unfused kernels
    (the same fp32 math; bench/RESULTS.md has the eager step before and after)."""
    if x.dtype == norm.weight.dtype:
        return norm(x)
    return F.rms_norm(x.float(), norm.normalized_shape, norm.weight, norm.eps).to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention; qkv rows are [q heads | k heads | v heads] (k, v: n_kv_heads each)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_size
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv) * self.hd, bias=cfg.attn_bias)
        self.out = nn.Linear(self.n_heads * self.hd, cfg.d_model, bias=False)
        # q/k norm over each head (Qwen3) or over the whole projection before the heads split (OLMoE)
        self.norm_proj = cfg.qk_norm and cfg.qk_norm_scope == "proj"
        q_size, k_size = (self.n_heads * self.hd, self.n_kv * self.hd) if self.norm_proj else (self.hd, self.hd)
        self.q_norm = nn.RMSNorm(q_size, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(k_size, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.rotary = Rotary(self.hd, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        # context parallelism, set from outside (moeflow.parallel.context_parallel.SequenceShard): this rank
        # holds a shard of every sequence; `positions(S_local, device)` are its tokens' true positions and
        # `attend(q, k, v)` is causal attention over the whole sequences
        self.sequence_shard = None

    def forward(self, x_BSD: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        qkv = self.qkv(x_BSD)
        if self.n_kv == self.n_heads and not self.norm_proj:
            q, k, v = qkv.view(B, S, 3, self.n_heads, self.hd).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = qkv.split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
            if self.norm_proj:
                q, k = norm_like_input(self.q_norm, q), norm_like_input(self.k_norm, k)
            q = q.view(B, S, self.n_heads, self.hd).transpose(1, 2)
            k, v = (t.view(B, S, self.n_kv, self.hd).transpose(1, 2) for t in (k, v))
        if self.q_norm is not None and not self.norm_proj:
            q, k = norm_like_input(self.q_norm, q), norm_like_input(self.k_norm, k)
        if self.sequence_shard is not None:
            if cache is not None:
                raise ValueError(
                    "a KV cache on a context-parallel model: generate from its checkpoint in one process instead"
                )
            positions = self.sequence_shard.positions(S, x_BSD.device)
            q, k = self.rotary(q, positions=positions), self.rotary(k, positions=positions)
            y = self.sequence_shard.attend(q, k, v)
            return self.out(y.transpose(1, 2).reshape(B, S, self.n_heads * self.hd))
        gqa = {"enable_gqa": True} if self.n_kv != self.n_heads else {}
        start = cache.length if cache is not None else 0
        q, k = self.rotary(q, start), self.rotary(k, start)
        if cache is not None:  # generation: attend to every earlier position too
            k, v = cache.append(self, k, v)
        # a prefill (start 0) is causal; one new token at a time sees all cached keys
        causal = start == 0
        if not causal and S > 1:
            raise ValueError("a KV cache step takes one new token at a time after the prefill")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)
        return self.out(y.transpose(1, 2).reshape(B, S, self.n_heads * self.hd))


class KVCache:
    """Keys and values of the positions seen so far, per attention layer (generation)."""

    def __init__(self):
        self.length = 0
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def append(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old = self._kv.get(id(layer))
        if old is not None:
            k, v = torch.cat([old[0], k], dim=-2), torch.cat([old[1], v], dim=-2)
        self._kv[id(layer)] = (k, v)
        return k, v

    def advance(self, n: int) -> None:
        self.length += n


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = ffn
        # activation checkpointing, set from outside (moeflow.parallel.activation_checkpointing):
        # a `context_fn` for torch.utils.checkpoint, or None to keep every activation
        self.checkpoint_context_fn = None

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        if self.checkpoint_context_fn is not None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(
                self._forward, x, token_ids, use_reentrant=False, context_fn=self.checkpoint_context_fn
            )
        return self._forward(x, token_ids, cache)

    def _forward(
        self, x: torch.Tensor, token_ids: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache)
        h = self.ffn_norm(x)
        return x + (self.ffn(h, token_ids) if isinstance(self.ffn, MoELayer) else self.ffn(h))


def build_moe_layer(cfg: ModelConfig) -> MoELayer:
    gate_opts = {k: v for k, v in cfg.gate.items() if k != "name"}
    gate = build_gate(cfg.gate["name"], cfg.d_model, cfg.num_experts, cfg.top_k, **gate_opts)
    experts = GroupedExperts(cfg.num_experts, cfg.d_model, cfg.d_ff, cfg.activation, impl=cfg.experts_impl)
    experts.gather_rows = cfg.experts_gather_rows
    shared = (
        SharedExpert(cfg.d_model, cfg.shared_hidden, cfg.activation, gated=cfg.shared_expert_gate)
        if cfg.shared_experts
        else None
    )
    return MoELayer(gate, experts, shared)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # one draw from the global RNG names the model's init; every tensor then has its own stream
        # (moeflow.moe.init), so a meta-device model initialised later gets the same weights
        self.init_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        dense_d_ff = cfg.dense_d_ff or cfg.d_ff * cfg.top_k
        self.blocks = nn.ModuleList(
            Block(cfg, build_moe_layer(cfg) if cfg.is_moe_block(i) else MLP(cfg.d_model, dense_d_ff, cfg.activation))
            for i in range(cfg.n_layers)
        )
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    def init_weights(self) -> None:
        """Every weight and buffer from `init_seed` (moeflow.moe.init): also after a meta-device model
        was parallelised and materialised (`to_empty`), with the same result on every layout."""
        init_weights(self, self.init_seed, self.cfg.init_std, self.cfg.n_layers)

    def moe_layers(self) -> list[MoELayer]:
        return moe_layers(self)

    def forward(self, tokens_BS: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits of every position; with a `KVCache`, of the new positions after the cached ones."""
        end = tokens_BS.shape[1] + (cache.length if cache is not None else 0)
        if end > self.cfg.max_seq_len:
            raise DataError(
                f"sequence length {end} exceeds model.max_seq_len={self.cfg.max_seq_len}; feed shorter sequences or build the model with a larger model.max_seq_len"
            )
        x = self.embed(tokens_BS)
        for block in self.blocks:
            x = block(x, tokens_BS, cache)
        if cache is not None:
            cache.advance(tokens_BS.shape[1])
        return self.lm_head(self.norm(x))

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' auxiliary losses from the last forward."""
        return moe_aux_loss(self)

    def num_params(self, active_only: bool = False) -> int:
        """The whole model's count, also when parallelised (a DTensor's numel is the full tensor's; plain
        shards of an engine without DTensors are counted by its `ParallelPlan.global_numel`)."""
        total = sum(p.numel() for p in self.parameters())
        if not active_only:
            return total
        for m in self.moe_layers():
            expert_params = sum(p.numel() for p in m.experts.parameters())
            total -= expert_params - expert_params * self.cfg.top_k // self.cfg.num_experts
        return total
