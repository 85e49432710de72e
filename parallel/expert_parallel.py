"""`parallelize(model, layout)`: expert + data parallelism applied to a plain model from outside.

What it does to the model (in place, before the optimizer is built):
- every MoELayer gets a dispatcher over the EP group (`parallel.dispatcher`), and its experts keep
  only this rank's slice of the stacked weights (w1_EDF / w3_EDF / w2_EFD, and the
  biases of upcycled experts) as their
  parameters, so the optimizer state is sharded the same way;
- every gate's `token_group` becomes the whole world, so aux losses and token
  statistics see the global batch exactly like a single process would;
- gradients: non-expert parameters are averaged over the world by DDP (expert
  parameters are hidden from it); expert gradients, which already hold every EP
  rank's tokens after the all-to-all backward, are summed over the expert-data-parallel
  group and divided by the world size in `finish_grad_sync()` (call it once per
  optimizer step, after the last micro-batch's backward: `no_sync` is implied for the
  earlier micro-batches).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from moeflow.moe.layer import MoELayer, moe_layers

from .dispatchers import DispatchOptions, build_dispatcher
from .layout import ParallelLayout

EXPERT_WEIGHTS = ("w1_EDF", "w3_EDF", "w2_EFD", "b1_EF", "b3_EF", "b2_ED")  # every one leads with E


def expert_shard(p: torch.Tensor) -> tuple[int, int, int] | None:
    """(full number of experts, first, end) of a sharded expert parameter, else None."""
    return getattr(p, "_moeflow_ep_shard", None)


def shard_experts(layer: MoELayer, ep_rank: int, ep: int) -> None:
    """Keep this rank's experts; the Parameter objects stay the same (only .data shrinks)."""
    experts = layer.experts
    E = experts.num_experts
    L = E // ep
    lo, hi = ep_rank * L, (ep_rank + 1) * L
    for name in EXPERT_WEIGHTS:
        p = getattr(experts, name, None)
        if p is None:
            continue
        p.data = p.data[lo:hi].clone()
        p._moeflow_ep_shard = (E, lo, hi)
    experts.num_experts = L


class ExpertDataParallel(DistributedDataParallel):
    """DDP over the world for non-expert parameters, plus the expert-parameter collectives."""

    def __init__(self, model: torch.nn.Module, layout: ParallelLayout, **ddp_kwargs):
        expert_names = [n for n, p in model.named_parameters() if expert_shard(p) is not None]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_names)
        super().__init__(model, **ddp_kwargs)
        self.layout = layout
        self.expert_params = [p for p in model.parameters() if expert_shard(p) is not None]

    def finish_grad_sync(self) -> None:
        """Sum expert gradients over the expert-data-parallel group, divide by the world size.

        After the all-to-all backward, expert e's gradient on its EP rank already sums the
        contributions of every rank in the EP group; the EDP sum adds the other replicas'
        batches, and dividing by the world size matches DDP's mean over ranks.
        """
        if not self.expert_params:
            return
        for p in self.expert_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.expert_params]
        flat = torch._utils._flatten_dense_tensors(grads)
        if self.layout.dp > 1:
            dist.all_reduce(flat, group=self.layout.edp_group)
        flat.div_(self.layout.world_size)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm with every expert counted exactly once, then clip everything.

        Non-expert gradients are identical on all ranks (count them once); expert shards
        are identical across the EDP group and disjoint across the EP group (sum their
        squares over the EP group only). Under tensor parallelism (a layout with `tp_group`,
        e.g. megatron's), params marked `tensor_model_parallel` (megatron's attribute) are
        disjoint slices over the TP group: their squares are summed over it as well.
        """
        params = [p for p in self.module.parameters() if p.grad is not None]
        tp_group = getattr(self.layout, "tp_group", None)
        dtype = torch.promote_types(params[0].grad.dtype, torch.float32) if params else torch.float32
        kinds = [[], [], [], []]  # grads: replicated, TP-sliced dense, EP-sharded, EP-sharded and TP-sliced
        for p in params:
            tp_sliced = tp_group is not None and getattr(p, "tensor_model_parallel", False)
            kinds[(2 if expert_shard(p) is not None else 0) + int(tp_sliced)].append(p.grad)
        zero = torch.zeros((), device=params[0].device if params else None, dtype=dtype)
        sq = torch.stack([torch.nn.utils.get_total_norm(g).to(dtype) ** 2 if g else zero for g in kinds])
        if self.layout.ep > 1:
            dist.all_reduce(sq[2:], group=self.layout.ep_group)
        if tp_group is not None:
            sq_tp = sq[1::2].contiguous()
            dist.all_reduce(sq_tp, group=tp_group)
            sq[1::2] = sq_tp
        total = sq.sum().sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def sync_routing_stats(self) -> None:
        sync_routing_stats(self.module)


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


def apply_expert_parallel(
    model: torch.nn.Module,
    layout: ParallelLayout,
    overlap_chunks: int = 1,
    overlap_shared: bool = False,
    dispatch: DispatchOptions | None = None,
) -> None:
    """The in-place part of `parallelize`: gates see the world; with layout.ep > 1 (or a transport
    named in `dispatch`) every MoELayer keeps this rank's experts and routes through that dispatcher.

    Gradient reduction is left to the caller (`parallelize`'s DDP wrapper, or an engine
    such as DeepSpeed that reduces dense and expert gradients itself).
    """
    dispatch = dispatch or DispatchOptions(overlap_chunks=overlap_chunks, overlap_shared=overlap_shared)
    routed = dispatch.resolved(layout.ep) != "local"
    if layout.ep > 1:
        model._moeflow_ep_group = layout.ep_group  # for gathering/resharding checkpoints
    for layer in moe_layers(model):
        layer.gate.token_group = dist.group.WORLD
        if layout.ep > 1:
            shard_experts(layer, layout.ep_rank, layout.ep)
        if routed:
            layer.dispatcher = build_dispatcher(dispatch, layout.ep_group, layout.ep, layer.experts.num_experts, layer)


def parallelize(
    model: torch.nn.Module,
    layout: ParallelLayout,
    overlap_chunks: int = 1,
    overlap_shared: bool = False,
    dispatch: DispatchOptions | None = None,
    **ddp_kwargs,
) -> ExpertDataParallel:
    """Apply expert parallelism (layout.ep > 1) and data parallelism to `model` in place.

    Returns the DDP-style wrapper to run forward/backward through; build the optimizer
    from `model.parameters()` afterwards so it holds only this rank's expert shards.
    """
    apply_expert_parallel(model, layout, overlap_chunks, overlap_shared, dispatch)
    return ExpertDataParallel(model, layout, **ddp_kwargs)


def ddp_device_kwargs(device: torch.device) -> dict:
    """DDP's device arguments: this rank's GPU on CUDA, none on CPU (gloo)."""
    return {"device_ids": [device.index]} if device.type == "cuda" else {}
