"""Expert MLPs: all experts' weights in stacked tensors, computed over rows grouped by expert.

`GroupedExperts.forward(x_AD, counts_E)` is the whole contract: rows arrive sorted by
expert (counts_E rows each) and leave in the same order. The pure-PyTorch `torch`
implementation here is the CPU path and the oracle for the Triton kernels.

Shape suffixes: A grouped rows, D model dim, F expert hidden dim, E experts.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .config import ACTIVATIONS
from .errors import ConfigError


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")


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


class SharedExpert(MLP):
    """The expert every token uses; `gated` scales its output by sigmoid(gate(x)) per token (Qwen2-MoE)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu", gated: bool = False):
        super().__init__(d_model, d_ff, activation)
        self.gate = nn.Linear(d_model, 1, bias=False) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if self.gate is None else torch.sigmoid(self.gate(x)) * y


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

    @property
    def fuses_permute(self) -> bool:
        """True when this impl gathers/scatters rows inside its kernels (`forward_routed`); never with biases,
        nor with `permute_fusion` off (tensor parallelism must reduce the rows before they are gate-weighted)."""
        return self.permute_fusion and self.impl in ROUTED_IMPLEMENTATIONS and self.b1_EF is None and self.b2_ED is None

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "swiglu",
        impl: str = "torch",
        bias: bool = False,
    ):
        super().__init__()
        _check_activation(activation)
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = activation
        self.impl = impl
        self.permute_fusion = True
        # Triton path: gather routed rows inside the GEMM loads (saves A x D activations per layer)
        # instead of copying them into expert order (faster on the H100)
        self.gather_rows = False
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

    @property
    def num_local_experts(self) -> int:
        """The experts this rank holds (`num_experts` stays the model's count under expert parallelism)."""
        return local_tensor(self.w1_EDF).shape[0]

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        impl = self.impl if self.b1_EF is None and self.b2_ED is None else "torch"  # only the reference has biases
        return IMPLEMENTATIONS[impl](self, x_AD, counts_E)

    def forward_routed(self, x_TD: torch.Tensor, plan) -> torch.Tensor:
        """combine(experts(x_TD[plan.token_A], plan.counts_E), plan), with the permutation fused where the impl can."""
        fn = ROUTED_IMPLEMENTATIONS.get(self.impl) if self.fuses_permute else None
        if fn is None:
            from .routing import combine

            return combine(self(x_TD[plan.token_A], plan.counts_E), plan)
        return fn(self, x_TD, plan)

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


def local_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's part of a parameter: its experts when expert parallelism made it a DTensor
    (sharded by expert), the tensor itself otherwise. Differentiable (gradients come back as DTensors)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def torch_loop(experts: GroupedExperts, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Per-expert loop over the row groups (reference implementation)."""
    outs = []
    w1, w3, w2, b1, b3, b2 = (
        local_tensor(t)
        for t in (experts.w1_EDF, experts.w3_EDF, experts.w2_EFD, experts.b1_EF, experts.b3_EF, experts.b2_ED)
    )
    counts = counts_E.tolist()
    rest = x_AD.shape[0] - sum(counts)  # rows past the last group (a worst-case receive buffer's tail): zeros out
    for e, rows_AD in enumerate(torch.split(x_AD, counts + [rest])[: len(counts)]):
        biases = [b[e] if b is not None else None for b in (b1, b3, b2)]
        outs.append(expert_mlp(rows_AD, w1[e], w3[e] if w3 is not None else None, w2[e], *biases))
    if rest:
        outs.append(x_AD.new_zeros(rest, experts.d_model))
    return torch.cat(outs) if outs else x_AD.new_zeros(0, experts.d_model)


def _warn_once(msg: str, _seen: set = set()) -> None:
    if msg not in _seen:
        _seen.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _kernel_weights(experts: GroupedExperts, x: torch.Tensor):
    """x and the weights in the compute dtype: autocast's (bf16 on GPU) when enabled, else x's."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    w3 = local_tensor(experts.w3_EDF).to(dtype) if experts.w3_EDF is not None else None
    return x.to(dtype), local_tensor(experts.w1_EDF).to(dtype), w3, local_tensor(experts.w2_EFD).to(dtype)


def _triton_ops(experts: GroupedExperts, x: torch.Tensor):
    """(kernel module, compute tensors), or None after a one-time warning when the kernels can't take x."""
    from moeflow.kernels import ops  # imports Triton: only when the impl is used

    reason = ops.triton_usable(x.device)
    if reason is None:
        args = _kernel_weights(experts, x)
        try:
            ops.check_inputs(*args[:4], torch.empty(experts.num_local_experts))
            return ops, args
        except ops.UnsupportedInput as e:
            reason = str(e)
    _warn_once(f"experts.impl=triton: {reason}; falling back to the torch reference path")
    return None


def _check_counts(x_AD: torch.Tensor, counts_E: torch.Tensor, num_experts: int) -> None:
    if counts_E.shape != (num_experts,):
        raise ValueError(f"counts_E must have shape ({num_experts},), got {tuple(counts_E.shape)}")
    # rows past the groups are ignored; checked where it costs no host sync (a CUDA read would stall the GPU)
    if counts_E.device.type == "cpu" and not torch.compiler.is_compiling() and int(counts_E.sum()) > x_AD.shape[0]:
        raise ValueError(f"counts_E sums to {int(counts_E.sum())} but x_AD has only {x_AD.shape[0]} rows")


def triton_grouped(experts: GroupedExperts, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Triton grouped GEMMs (moeflow.kernels) on rows already grouped by expert."""
    _check_counts(x_AD, counts_E, experts.num_local_experts)
    found = _triton_ops(experts, x_AD)
    if found is None:
        return torch_loop(experts, x_AD, counts_E)
    ops, (x, w1, w3, w2) = found
    return ops.expert_mlp(x, w1, w3, w2, counts_E)


def triton_routed(experts: GroupedExperts, x_TD: torch.Tensor, plan) -> torch.Tensor:
    """Triton path with the un-permutation fused (weighted scatter in the last GEMM's stores)."""
    found = _triton_ops(experts, x_TD)
    if found is None:
        from .routing import combine

        return combine(torch_loop(experts, x_TD[plan.token_A], plan.counts_E), plan)
    ops, (x, w1, w3, w2) = found
    return ops.expert_mlp_routed(
        x, w1, w3, w2, plan.counts_E, plan.token_A, plan.weight_A, plan.token_order_A, gather_rows=experts.gather_rows
    )


def grouped_mm(experts: GroupedExperts, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm over 16-row padded groups (the cuBLAS baseline)."""
    from moeflow.kernels.torch_grouped_mm import grouped_mm_mlp

    if x_AD.device.type != "cuda":
        _warn_once("experts.impl=grouped_mm needs a CUDA GPU; falling back to the torch reference path")
        return torch_loop(experts, x_AD, counts_E)
    x, w1, w3, w2 = _kernel_weights(experts, x_AD)
    if x.dtype != torch.bfloat16:
        _warn_once(f"experts.impl=grouped_mm needs bf16 (got {x.dtype}); falling back to the torch reference path")
        return torch_loop(experts, x_AD, counts_E)
    return grouped_mm_mlp(x, w1, w3, w2, counts_E)


# impl name -> fn(experts, x_AD, counts_E) -> y_AD
IMPLEMENTATIONS = {"torch": torch_loop}
# impls that also take unpermuted tokens: fn(experts, x_TD, plan) -> y_TD (dispatch.combine's semantics)
ROUTED_IMPLEMENTATIONS = {}
if importlib.util.find_spec("triton") is not None:  # found, not imported: moe/ stays Triton-free at import
    IMPLEMENTATIONS["triton"] = triton_grouped
    ROUTED_IMPLEMENTATIONS["triton"] = triton_routed
if hasattr(torch, "_grouped_mm"):
    IMPLEMENTATIONS["grouped_mm"] = grouped_mm
