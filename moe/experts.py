"""Expert MLPs: all experts' weights in stacked tensors, computed over rows grouped by expert.

`GroupedExperts.forward(x_AD, counts_E)` is the whole contract: rows arrive sorted by
expert (counts_E rows each) and leave in the same order. The pure-PyTorch `torch`
implementation here is the CPU path and the oracle for the Triton kernels.

Shape suffixes: A grouped rows, D model dim, F expert hidden dim, E experts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("swiglu", "gelu")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")


class MLP(nn.Module):
    """Dense FFN (dense layers, shared experts): SwiGLU or GELU."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu"):
        super().__init__()
        _check_activation(activation)
        self.activation = activation
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False) if activation == "swiglu" else None
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


def expert_mlp(x_AD, w1_DF, w3_DF, w2_FD, b1_F=None, b3_F=None, b2_D=None):
    """One expert's MLP on its rows; the reference math every implementation must match.

    The optional biases exist for upcycled models whose dense MLP had them (GPT-2).
    """
    if b1_F is None and b2_D is None:
        if w3_DF is not None:
            return (F.silu(x_AD @ w1_DF) * (x_AD @ w3_DF)) @ w2_FD
        return F.gelu(x_AD @ w1_DF, approximate="tanh") @ w2_FD
    h1_AF = x_AD @ w1_DF if b1_F is None else torch.addmm(b1_F, x_AD, w1_DF)
    if w3_DF is not None:
        h_AF = F.silu(h1_AF) * (x_AD @ w3_DF if b3_F is None else torch.addmm(b3_F, x_AD, w3_DF))
    else:
        h_AF = F.gelu(h1_AF, approximate="tanh")
    return h_AF @ w2_FD if b2_D is None else torch.addmm(b2_D, h_AF, w2_FD)


class GroupedExperts(nn.Module):
    """E expert MLPs stored as w1_EDF, w3_EDF (SwiGLU only), w2_EFD.

    `impl` selects the compute: "torch" is a per-expert loop (reference). Later
    implementations (Triton, torch._grouped_mm) register in `IMPLEMENTATIONS`.
    `bias=True` adds b1_EF, b3_EF (SwiGLU only), b2_ED (for upcycled MLPs that had
    biases); experts with biases always compute with the "torch" implementation.
    """

    fuses_permute = False

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "swiglu", impl: str = "torch", bias: bool = False):
        super().__init__()
        _check_activation(activation)
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = activation
        self.impl = impl
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff)) if activation == "swiglu" else None
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b1_EF = nn.Parameter(torch.zeros(num_experts, d_ff)) if bias else None
        self.b3_EF = nn.Parameter(torch.zeros(num_experts, d_ff)) if bias and activation == "swiglu" else None
        self.b2_ED = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w1_EDF, std=std)
        if self.w3_EDF is not None:
            nn.init.normal_(self.w3_EDF, std=std)
        nn.init.normal_(self.w2_EFD, std=out_std if out_std is not None else std)
        for b in (self.b1_EF, self.b3_EF, self.b2_ED):
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        impl = self.impl if self.b1_EF is None and self.b2_ED is None else "torch"  # only the reference has biases
        return IMPLEMENTATIONS[impl](self, x_AD, counts_E)

    @torch.no_grad()
    def load_from_mlp(self, mlp: MLP, experts: list[int] | None = None) -> None:
        """Copy a dense MLP into the given experts (all by default): upcycling's core step."""
        for e in range(self.num_experts) if experts is None else experts:
            self.w1_EDF[e].copy_(mlp.w1.weight.t())
            if self.w3_EDF is not None:
                self.w3_EDF[e].copy_(mlp.w3.weight.t())
            self.w2_EFD[e].copy_(mlp.w2.weight.t())

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation}, impl={self.impl}"


def torch_loop(experts: GroupedExperts, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Per-expert loop over the row groups (reference implementation)."""
    outs = []
    for e, rows_AD in enumerate(torch.split(x_AD, counts_E.tolist())):
        w3 = experts.w3_EDF[e] if experts.w3_EDF is not None else None
        biases = [b[e] if b is not None else None for b in (experts.b1_EF, experts.b3_EF, experts.b2_ED)]
        outs.append(expert_mlp(rows_AD, experts.w1_EDF[e], w3, experts.w2_EFD[e], *biases))
    return torch.cat(outs) if outs else x_AD.new_zeros(0, experts.d_model)


# impl name -> fn(experts, x_AD, counts_E) -> y_AD
IMPLEMENTATIONS = {"torch": torch_loop}


def init_std_for_output(n_layers: int, std: float = 0.02) -> float:
    """GPT-2 style scaled init for projections that write into the residual stream."""
    return std / math.sqrt(2 * n_layers)
