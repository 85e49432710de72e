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


@torch.no_grad()
def routing_stats_to_host(model: torch.nn.Module) -> None:
    """Every MoE layer's `last_stats` as CPU tensors, read in one device-to-host copy. A log point reads
    ~6 statistics per layer, and each `.item()` of a device tensor is a sync and a copy of its own: on an
    H100 these reads and their idle GPU were ~5% of a 10-step log interval of the 4-layer OLMoE-like
    model. Values and dtypes are kept exactly (float64 holds every float32 and count)."""
    layers = [layer for layer in moe_layers(model) if layer.last_stats]
    items = [
        (layer, k, v)
        for layer in layers
        for k, v in layer.last_stats.items()
        if isinstance(v, torch.Tensor) and v.device.type != "cpu"
    ]
    if not items:
        return
    out = {id(layer): dict(layer.last_stats) for layer in layers}
    for (layer, k, _), host in zip(items, gathered_to_host([v for _, _, v in items])):
        out[id(layer)][k] = host
    for layer in layers:
        layer.last_stats = out[id(layer)]


def gathered_to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """CPU copies of `tensors` (any shapes, float or integer dtypes, on one device) through one copy."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]).cpu()
    out, at = [], 0
    for t in tensors:
        out.append(flat[at : at + t.numel()].reshape(t.shape).to(t.dtype))
        at += t.numel()
    return out
