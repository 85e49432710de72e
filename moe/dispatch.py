"""Dispatchers move token rows to the experts and the expert outputs back.

The local dispatcher sorts assignments by expert, gathers rows, runs the experts on
the grouped rows and scatter-adds the gate-weighted outputs. Expert parallelism swaps
in an all-to-all dispatcher (`moeflow.parallel`) with the same call signature:
`dispatcher(x_TD, routing, experts, shared_expert=None) -> y_TD`.
Experts that fuse the permutation into their kernels (`fuses_permute = True`) receive
the plan and the unpermuted tokens instead.

Shape suffixes: T tokens, D model dim, E experts, A assignments (sorted by expert).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

from .gates.base import RouterOutput
from .gates.common import counts_of, stable_order


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


@functools.cache
def _gather_sum():
    if importlib.util.find_spec("triton") is None:
        return None
    from moeflow.kernels.combine import gather_sum

    return gather_sum


def combine(y_AD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Weighted scatter-add of grouped expert outputs back to token order (unrouted tokens get 0).
    On CUDA with Triton: one gather-sum per token (`moeflow.kernels.combine`: no weighted copy of
    the rows, no atomics)."""
    if y_AD.is_cuda and _gather_sum() is not None:
        return _gather_sum()(y_AD, plan.weight_A, plan.token_A, plan.num_tokens)
    weighted_AD = y_AD * plan.weight_A.to(y_AD.dtype).unsqueeze(-1)
    y_TD = y_AD.new_zeros(plan.num_tokens, y_AD.shape[-1])
    return y_TD.index_add(0, plan.token_A, weighted_AD)


class LocalDispatcher:
    """All experts live in this process.

    Every dispatcher takes the layer's shared expert too and adds its output: a dispatcher
    that moves tokens between ranks can compute it while they are in flight.
    """

    def __call__(self, x_TD: torch.Tensor, routing: RouterOutput, experts, shared_expert=None) -> torch.Tensor:
        plan = plan_dispatch(routing)
        if getattr(experts, "fuses_permute", False):
            y_TD = experts.forward_routed(x_TD, plan)
        else:
            y_TD = combine(experts(x_TD[plan.token_A], plan.counts_E), plan)
        return y_TD + shared_expert(x_TD) if shared_expert is not None else y_TD
