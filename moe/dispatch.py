"""Dispatchers move token rows to the experts and the expert outputs back.

The local dispatcher sorts assignments by expert, gathers rows, runs the experts on
the grouped rows and scatter-adds the gate-weighted outputs. Expert parallelism swaps
in an all-to-all dispatcher (`moeflow.parallel`) with the same call signature:
`dispatcher(x_TD, routing, experts, shared_expert=None) -> y_TD`.
Experts that fuse the permutation into their kernels (`fuses_permute = True`) receive
the plan and the unpermuted tokens instead. The plan and the combine are `moeflow.moe.routing`'s,
shared with the expert-parallel dispatchers.

Shape suffixes: T tokens, D model dim, E experts, A assignments (sorted by expert).
"""

from __future__ import annotations

import torch

# DispatchPlan is not used here: it stays importable from this module (with plan_dispatch and combine) for the tests
from .routing import DispatchPlan, RouterOutput, combine, plan_dispatch  # noqa: F401


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
