"""Experts as copies of one dense FFN: the canonical dense form, filling experts and router."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..experts import MLP, GroupedExperts
from ..gates import build_gate
from ..layer import MoELayer
from .options import UpcycleError, UpcycleOptions


@dataclass
class DenseFFN:
    w1_FD: torch.Tensor  # input projection (the gate projection of a SwiGLU MLP)
    w2_DF: torch.Tensor  # output projection
    w3_FD: torch.Tensor | None = None  # SwiGLU's up projection
    b1_F: torch.Tensor | None = None
    b3_F: torch.Tensor | None = None
    b2_D: torch.Tensor | None = None

    @property
    def activation(self) -> str:
        return "swiglu" if self.w3_FD is not None else "gelu"

    @property
    def has_bias(self) -> bool:
        return any(b is not None for b in (self.b1_F, self.b3_F, self.b2_D))

    @property
    def d_ff(self) -> int:
        return self.w1_FD.shape[0]

    @property
    def d_model(self) -> int:
        return self.w1_FD.shape[1]

    @classmethod
    def from_mlp(cls, mlp: MLP) -> DenseFFN:
        return cls(mlp.w1.weight, mlp.w2.weight, mlp.w3.weight if mlp.w3 is not None else None)

    @classmethod
    def from_expert(cls, experts: GroupedExperts, e: int = 0) -> DenseFFN:
        pick = lambda t: t[e] if t is not None else None  # noqa: E731
        w3 = experts.w3_EDF[e].t() if experts.w3_EDF is not None else None
        return cls(
            experts.w1_EDF[e].t(),
            experts.w2_EFD[e].t(),
            w3,
            pick(experts.b1_EF),
            pick(experts.b3_EF),
            pick(experts.b2_ED),
        )


def _noisy(t: torch.Tensor, rel_std: float, gen: torch.Generator | None) -> torch.Tensor:
    if rel_std <= 0:
        return t
    noise = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.device, t.dtype)
    return t + noise * (rel_std * t.float().std().clamp_min(1e-12).item())


@torch.no_grad()
def fill_experts(
    experts: GroupedExperts,
    ffn: DenseFFN,
    copies: int,
    granularity: int,
    out_scale: float = 1.0,
    noise: float = 0.0,
    gen: torch.Generator | None = None,
) -> None:
    """Copy `ffn` into copies*granularity experts: expert c*m + j holds slice j of copy c.

    Slices are scaled by m (and by out_scale, e.g. 1 - shared_fraction) on the output side.
    """
    m, F_ = granularity, ffn.d_ff
    if F_ % m:
        raise UpcycleError(f"granularity={m} does not divide the MLP hidden size {F_}; pick a divisor of {F_}")
    if experts.num_experts != copies * m or experts.d_ff != F_ // m:
        raise UpcycleError(
            f"experts module has {experts.num_experts} experts of width {experts.d_ff}, expected {copies * m} of width {F_ // m}"
        )
    if (experts.w3_EDF is None) != (ffn.w3_FD is None):
        raise UpcycleError(f"experts activation {experts.activation} does not match the dense MLP ({ffn.activation})")
    width, scale = F_ // m, m * out_scale
    for c in range(copies):
        for j in range(m):
            e, sl = c * m + j, slice(j * width, (j + 1) * width)
            experts.w1_EDF[e].copy_(_noisy(ffn.w1_FD[sl].t(), noise, gen))
            if ffn.w3_FD is not None:
                experts.w3_EDF[e].copy_(_noisy(ffn.w3_FD[sl].t(), noise, gen))
            experts.w2_EFD[e].copy_(_noisy(ffn.w2_DF[:, sl].t() * scale, noise, gen))
            for dst, src in ((experts.b1_EF, ffn.b1_F), (experts.b3_EF, ffn.b3_F)):
                if dst is not None:
                    dst[e].copy_(src[sl] if src is not None else torch.zeros_like(dst[e]))
            if experts.b2_ED is not None:
                # not sliced or scaled by m: a token's gate weights sum to 1, so b2 is added once
                experts.b2_ED[e].copy_(
                    ffn.b2_D * out_scale if ffn.b2_D is not None else torch.zeros_like(experts.b2_ED[e])
                )


@torch.no_grad()
def init_router(gate: nn.Module, num_experts: int, opts: UpcycleOptions, gen: torch.Generator | None = None) -> None:
    """Zero or small-normal router weights; normal rows tied across the m slices of a copy."""
    kind, m = opts.resolved_router_init, opts.granularity
    for name, p in gate.named_parameters():
        if p.dim() == 1 and p.shape[0] == num_experts:
            p.zero_()  # router biases: uniform start
            continue
        if p.dim() != 2 or num_experts not in p.shape:
            continue
        experts_first = p.shape[0] == num_experts
        w_ED = p if experts_first else p.t()
        if kind == "zero" or opts.router_std == 0:
            w_ED.zero_()
            continue
        rows = torch.randn((num_experts // m, w_ED.shape[1]), generator=gen, dtype=torch.float32) * opts.router_std
        w_ED.copy_(rows.repeat_interleave(m, dim=0).to(p.dtype))


def build_upcycled_layer(
    ffn: DenseFFN,
    opts: UpcycleOptions,
    experts_impl: str = "torch",
    shared: nn.Module | None = None,
    gen: torch.Generator | None = None,
) -> MoELayer:
    """A `MoELayer` whose experts are (granular) copies of `ffn`: the generic building block."""
    E, K = opts.total_experts, opts.active_experts
    if ffn.d_ff % opts.granularity:
        raise UpcycleError(
            f"granularity={opts.granularity} does not divide the MLP hidden size {ffn.d_ff}; pick a divisor of {ffn.d_ff}"
        )
    try:
        gate = build_gate(opts.gate, ffn.d_model, E, K, **opts.gate_options)
    except (TypeError, ValueError) as e:
        raise UpcycleError(str(e)) from None
    experts = GroupedExperts(
        E, ffn.d_model, ffn.d_ff // opts.granularity, ffn.activation, impl=experts_impl, bias=ffn.has_bias
    )
    layer = MoELayer(gate, experts, shared)
    fill_moe_layer(layer, ffn, opts, gen)
    return layer.to(device=ffn.w1_FD.device, dtype=ffn.w1_FD.dtype)


@torch.no_grad()
def fill_moe_layer(layer: MoELayer, ffn: DenseFFN, opts: UpcycleOptions, gen: torch.Generator | None = None) -> None:
    out_scale = 1.0 - opts.shared_fraction if layer.shared_expert is not None else 1.0
    fill_experts(layer.experts, ffn, opts.num_experts, opts.granularity, out_scale, opts.expert_noise, gen)
    init_router(layer.gate, opts.total_experts, opts, gen)
    if isinstance(layer.shared_expert, MLP):
        s = layer.shared_expert
        s.w1.weight.copy_(ffn.w1_FD)
        if s.w3 is not None:
            s.w3.weight.copy_(ffn.w3_FD)
        s.w2.weight.copy_(ffn.w2_DF * opts.shared_fraction)
