"""Gradient clipping by the global norm, over parameters that live on different meshes.

`torch.nn.utils.clip_grad_norm_` cannot mix DTensors of different meshes (dense weights on the
FSDP mesh, experts on the expert mesh). Here the squared norm is each rank's local shards'
squares, each divided by how many ranks in the world hold a copy of it (replicated mesh dims,
ranks outside a sub-mesh; every rank for a plain tensor, unless the plan says it is a shard), summed over the world in one
all-reduce: the single-process norm of the same gradients. Every gradient is then scaled by
the same factor. Under pipeline parallelism each stage's ranks hold different parameters: copies
are counted within a stage (`world`, the plan's), and the all-reduce over the whole world adds
the stages' squares.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .plan import copies_in_world


@torch.no_grad()
def global_grad_norm(
    grads: list[torch.Tensor], copies: list[int] | None = None, world: int | None = None
) -> torch.Tensor:
    """The L2 norm of all `grads` together (plain tensors, or DTensors on meshes spanning the world):
    one multi-tensor norm per copy count (`torch._foreach_norm`: each gradient read once), one all-reduce.
    `copies` (a plan's `copies`, one per gradient) says how many ranks hold each element of a plain
    tensor that is a shard; without it a plain tensor is the same on every rank. `world`: the ranks that
    hold parts of the same parameters (one pipeline stage's; default the whole world)."""
    from torch.distributed.tensor import DTensor

    everyone = dist.get_world_size() if dist.is_initialized() else 1
    world = world or everyone
    by_copies: dict[int, list[torch.Tensor]] = {}
    for i, g in enumerate(grads):
        n = copies[i] if copies is not None else copies_in_world(g, world)
        by_copies.setdefault(n, []).append(g.to_local() if isinstance(g, DTensor) else g)
    first = next(iter(by_copies.values()))[0]
    dtype = torch.promote_types(first.dtype, torch.float32)  # fp32, or fp64 for a float64 model
    square = torch.zeros((), dtype=dtype, device=first.device)
    for n, tensors in by_copies.items():
        norms = torch._foreach_norm(tensors, 2.0, dtype=dtype)
        square += torch.stack(norms).square().sum() / n
    if everyone > 1:
        dist.all_reduce(square)
    return square.sqrt()


def folds_clip_into_step(optimizer) -> bool:
    """Whether `optimizer.step()` can apply the clip factor itself: torch's fused Adam/AdamW divide
    each gradient by `optimizer.grad_scale` as they read it (the hook GradScaler uses), so no pass
    over the gradients is needed. Plain tensors only (a DTensor step takes no plain-tensor scale)."""
    from torch.distributed.tensor import DTensor

    if optimizer is None:
        return False
    groups = optimizer.param_groups
    if any(isinstance(p, DTensor) for g in groups for p in g["params"]):
        return False
    if getattr(optimizer, "accepts_grad_scale", False):  # an optimizer of ours that reads it (launch/optim.py)
        return True
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and all(g.get("fused") for g in groups)


@torch.no_grad()
@torch.profiler.record_function(
    "moeflow/clip_grad_norm"
)  # a scope trainer.profile=true groups by (launch/profiling.py)
def clip_grad_norm_(
    parameters, max_norm: float, optimizer=None, copies: list[int] | None = None, world: int | None = None
) -> torch.Tensor:
    """Clip to `max_norm` (inf: no clipping); returns the pre-clip global norm (fp32). With an
    `optimizer` that `folds_clip_into_step`, the factor goes to its next step (`grad_scale`, cleared by
    `clear_folded_clip` after the step); otherwise the gradients are scaled in place, in one
    multi-tensor multiply. `copies`: one per parameter, for plain tensors that are shards; `world`: the
    ranks of one pipeline stage (`global_grad_norm`)."""
    parameters = list(parameters)
    has_grad = [i for i, p in enumerate(parameters) if p.grad is not None]
    grads = [parameters[i].grad for i in has_grad]
    if not grads:
        return torch.zeros(())
    total = global_grad_norm(grads, [copies[i] for i in has_grad] if copies is not None else None, world)
    if math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's own rule, on the device: no host read
        if folds_clip_into_step(optimizer):
            optimizer.grad_scale = coef.reciprocal()
        else:
            torch._foreach_mul_([g._local_tensor if hasattr(g, "_local_tensor") else g for g in grads], coef)
    return total


def clear_folded_clip(optimizer) -> None:
    """After the step that applied it: the next step must not reuse this step's clip factor."""
    optimizer.__dict__.pop("grad_scale", None)
