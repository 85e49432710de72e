"""Routing: which token goes to which expert, and how the expert outputs come back.

A gate's decision is a `RouterOutput`, a flat list of (token, expert, weight) assignments.
Gates and dispatchers (the local one here in moe/, the expert-parallel ones in moeflow.parallel)
derive the rest from it with the helpers below, so each is written once:

- `counts_of`: assignments per expert (gates' load statistics and losses, dispatch plans);
- `stable_order`: a stable sort of small integer ids (by expert, by chunk, by local expert);
- `plan_dispatch` -> `DispatchPlan`: the assignments grouped by expert;
- `combine`: the gate-weighted sum of grouped expert outputs back into token order.

Shape suffixes: T tokens, D model dim, E experts, A assignments (sorted by expert in a plan).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RouterOutput:
    """What every gate returns.

    token_A, expert_A, weight_A: one entry per (token, expert) assignment, any order
        (gates that emit them token-major say so with `token_sorted=True`).
    losses: auxiliary losses, already multiplied by their coefficients; the trainer adds
        their sum to the LM loss.
    stats: detached scalars/tensors for logging (see `moeflow.moe.stats`).
    """

    token_A: torch.Tensor
    expert_A: torch.Tensor
    weight_A: torch.Tensor
    num_tokens: int
    num_experts: int
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    # True when token_A is non-decreasing (token-major order, as top-k emits it): the fused
    # kernels then know each assignment's place among its token's rows without a second sort.
    token_sorted: bool = False

    def aux_loss(self) -> torch.Tensor:
        if not self.losses:
            return self.weight_A.new_zeros(())
        return torch.stack([v.float() for v in self.losses.values()]).sum()


def counts_of(expert_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert (int64). Not torch.bincount: on CUDA that reads the maximum back
    to the host, and the sync leaves the GPU idle while the CPU queues the next kernels."""
    ones = torch.ones_like(expert_A, dtype=torch.int64)
    return torch.zeros(num_experts, dtype=torch.int64, device=expert_A.device).scatter_add_(0, expert_A.long(), ones)


def stable_order(ids: torch.Tensor, num_values: int) -> torch.Tensor:
    """torch.argsort(ids, stable=True) for ids in [0, num_values), sorted as the narrowest integer
    type that holds them: a GPU radix sort makes one pass per key byte (8 for int64 ids)."""
    narrow = (
        torch.uint8
        if num_values <= 256
        else torch.int16
        if num_values <= 2**15
        else torch.int32
        if num_values <= 2**31
        else ids.dtype
    )
    return torch.argsort(ids.to(narrow), stable=True)


@dataclass
class DispatchPlan:
    """Assignments sorted by expert: rows [offsets_E[e], offsets_E[e] + counts_E[e]) are expert e's."""

    token_A: torch.Tensor  # source token of each grouped row
    weight_A: torch.Tensor  # gate weight of each grouped row
    expert_A: torch.Tensor  # expert of each grouped row (non-decreasing)
    counts_E: torch.Tensor  # rows per expert (int64)
    num_tokens: int
    # where each grouped row sat in the routing's token-major order (None unless the gate's
    # token_A was sorted): the fused kernels' un-permute uses it instead of sorting again
    token_order_A: torch.Tensor | None = None


def plan_dispatch(routing: RouterOutput) -> DispatchPlan:
    order_A = stable_order(routing.expert_A, routing.num_experts)
    expert_A = routing.expert_A[order_A]
    counts_E = counts_of(expert_A, routing.num_experts)
    return DispatchPlan(
        token_A=routing.token_A[order_A],
        # index_select, not [order_A]: its backward is one scatter (order_A is a permutation), not a sort
        weight_A=routing.weight_A.index_select(0, order_A),
        expert_A=expert_A,
        counts_E=counts_E,
        num_tokens=routing.num_tokens,
        token_order_A=order_A if routing.token_sorted else None,
    )


_UNRESOLVED = object()
_gather_sum_kernel = _UNRESOLVED


def _gather_sum():
    """moeflow's Triton gather-sum, or None without Triton; resolved once (a module global, not
    functools.cache, which torch.compile traces through with a warning in every compiled run)."""
    global _gather_sum_kernel
    if _gather_sum_kernel is _UNRESOLVED:
        try:  # Triton is an optional dependency
            import triton  # noqa: F401
        except ImportError:
            _gather_sum_kernel = None
        else:  # with Triton, a broken kernel module is an error, not a silent fallback
            from moeflow.kernels.combine import gather_sum

            _gather_sum_kernel = gather_sum
    return _gather_sum_kernel


def combine(y_AD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Weighted scatter-add of grouped expert outputs back to token order (unrouted tokens get 0).
    On CUDA with Triton: one gather-sum per token (`moeflow.kernels.combine`: no weighted copy of
    the rows, no atomics)."""
    if y_AD.is_cuda and _gather_sum() is not None:
        return _gather_sum()(y_AD, plan.weight_A, plan.token_A, plan.num_tokens)
    weighted_AD = y_AD * plan.weight_A.to(y_AD.dtype).unsqueeze(-1)
    y_TD = y_AD.new_zeros(plan.num_tokens, y_AD.shape[-1])
    return y_TD.index_add(0, plan.token_A, weighted_AD)
