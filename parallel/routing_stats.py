"""Routing statistics of the global batch: every rank's MoE-layer counts summed, scalars averaged."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeflow.moe.layer import moe_layers


@torch.no_grad()
def sync_routing_stats(model: torch.nn.Module, group=None) -> None:
    """Aggregate every MoE layer's `last_stats` over `group` (default: the world; collective).

    tokens_per_expert is summed (and load_max_over_mean recomputed from the sum); the
    other scalars are averaged (every rank routes the same number of tokens). Under tensor
    parallelism pass the data-parallel group: the ranks of a TP group route the same tokens.
    """
    for layer in moe_layers(model):
        if not layer.last_stats:
            continue
        s = layer.last_stats
        counts_E = s["tokens_per_expert"].float().clone()
        dist.all_reduce(counts_E, group=group)
        keys = sorted(k for k, v in s.items() if v.dim() == 0 and k != "load_max_over_mean")
        scalars = torch.stack([s[k].float().to(counts_E.device) for k in keys]) if keys else counts_E.new_zeros(0)
        dist.all_reduce(scalars, group=group)
        scalars /= dist.get_world_size(group)
        out = dict(s)
        out.update({k: scalars[i] for i, k in enumerate(keys)})
        out["tokens_per_expert"] = counts_E
        out["load_max_over_mean"] = counts_E.max() / counts_E.mean().clamp_min(1e-9)
        layer.last_stats = out
