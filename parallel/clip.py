"""Gradient clipping by the global norm, over parameters that live on different meshes.

`torch.nn.utils.clip_grad_norm_` cannot mix DTensors of different meshes (dense weights on the
FSDP mesh, experts on the expert mesh). Here the squared norm is each rank's local shards'
squares, each divided by how many ranks in the world hold a copy of it (replicated mesh dims,
ranks outside a sub-mesh; every rank for a plain tensor), summed over the world in one
all-reduce: the single-process norm of the same gradients. Every gradient is then scaled by
the same factor.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all `grads` together (plain tensors, or DTensors on meshes spanning the world)."""
    from torch.distributed.tensor import DTensor

    device = (grads[0].to_local() if isinstance(grads[0], DTensor) else grads[0]).device
    square = torch.zeros((), dtype=torch.float32, device=device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    for g in grads:
        if isinstance(g, DTensor):
            # copies of each element in the world: replicated mesh dims, and ranks outside this mesh
            # (a sub-mesh, e.g. experts sharded over "ep" only and replicated over the rest)
            outside = world // g.device_mesh.size()
            copies = outside * math.prod(g.device_mesh.size(i) for i, pl in enumerate(g.placements) if pl.is_replicate())
            square += g.to_local().float().square().sum() / copies
        else:  # a plain tensor of a parallel model is the same on every rank
            square += g.float().square().sum() / world
    if world > 1:
        dist.all_reduce(square)
    return square.sqrt()


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Clip in place to `max_norm` (inf: no clipping); returns the pre-clip global norm (fp32)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = global_grad_norm(grads)
    if math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's own rule, on the device: no host read
        for g in grads:
            (g._local_tensor if hasattr(g, "_local_tensor") else g).mul_(coef)
    return total
