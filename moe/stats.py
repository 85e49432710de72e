"""Routing statistics for one MoE layer and one forward pass (detached, cheap)."""

from __future__ import annotations

import torch

from .routing import RouterOutput, counts_of


def routing_stats(routing: RouterOutput, counts_E: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """tokens per expert, max/mean load, mean active experts per token, plus the gate's own stats.

    The gate reports `dropped_fraction` when it drops; otherwise it is 0. Every value lives on the
    routing's device: a CPU scalar in a compiled GPU graph costs Inductor a C++ kernel (and its cold
    compiler check, ~8 s on an H100 host) for nothing.
    """
    with torch.no_grad():
        if counts_E is None:
            counts_E = counts_of(routing.expert_A, routing.num_experts)
        counts_E = counts_E.float()
        mean = counts_E.mean().clamp_min(1e-9)
        stats = {
            "tokens_per_expert": counts_E,
            "load_max_over_mean": counts_E.max() / mean if counts_E.numel() else mean * 0,
            "active_experts_per_token": torch.full(
                (), routing.expert_A.numel() / max(routing.num_tokens, 1), device=counts_E.device
            ),
            "dropped_fraction": torch.zeros((), device=counts_E.device),
        }
        stats.update({k: v.detach() for k, v in routing.stats.items()})
        stats.update({f"loss/{k}": v.detach() for k, v in routing.losses.items()})
    return stats
