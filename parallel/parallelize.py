"""`parallelize(model, mesh, ...)`: FSDP2 + expert parallelism applied to a plain `Transformer`.

In place, from outside, before the optimizer is built (and usually on the meta device, before
the weights are materialised and initialised: `materialize`):

1. every gate's `token_group` becomes the world (under pipeline parallelism: the ranks of the
   stage, `mesh.stage_group`), so aux losses, capacities and Sinkhorn marginals see the global batch;
2. expert parallelism (ep > 1): each MoE layer's stacked expert weights become DTensors sharded
   by expert (`Shard(0)`) over the mesh's "ep" dimension, and its dispatcher moves tokens over
   that group (`parallel.dispatcher`: see dispatchers.py; a named transport runs with ep=1 too);
   context parallelism (cp > 1): every attention layer gets the CP group's `SequenceShard` (causal
   attention over the whole sequences; rotary positions are the shard's true ones);
3. activation checkpointing of the blocks (`parallel.activation_checkpointing`);
4. `fully_shard` (FSDP2; `ShardingOptions.fully_shard=False` skips it, and 5, for an engine that
   reduces gradients itself): each MoE layer's experts are one unit over the expert-FSDP mesh
   (the ranks holding the same experts; sharded on their model dim when EP also shards them),
   each block one unit over the dense mesh (HSDP when dp_replicate > 1), the root (embedding,
   final norm, LM head) the last;
5. mixed precision: parameters kept in fp32 (the optimizer's master weights), all-gathered for
   compute in `param_dtype` (bf16 on GPUs), gradients reduced in `reduce_dtype` (fp32).

Gradients are reduced by SUM (no per-unit averaging: FSDP would average each unit over its
own mesh, which differs between experts and dense weights); the engine divides the loss by the
number of data-parallel ranks (times the CP ranks sharing each sequence: `ParallelDims.grad_ranks`) instead, so every gradient is the single-process gradient of the
global batch's mean loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moeflow.moe.errors import ConfigError
from moeflow.moe.layer import moe_layers

from .dispatchers import DispatchOptions, build_dispatcher
from .mesh import ParallelMesh
from .plan import EXPERT_WEIGHTS, LocalShard, ParallelPlan, ShardStep, expert_rows


@dataclass
class ShardingOptions:
    param_dtype: torch.dtype | None = None  # compute dtype of all-gathered weights; None: the parameters' own
    reduce_dtype: torch.dtype = torch.float32
    reshard_after_forward: bool = True
    dispatch: DispatchOptions = field(default_factory=DispatchOptions)
    # False: no FSDP, and expert shards stay plain tensors (recorded in the plan), for an engine that
    # reduces gradients itself and takes no DTensors (DeepSpeed)
    fully_shard: bool = True


def shard_experts_by_expert(model: nn.Module, mesh: ParallelMesh, opts: ShardingOptions) -> dict[str, LocalShard]:
    """Each MoE layer keeps this EP rank's experts (Shard(0) over "ep": DTensors, or plain tensors whose
    placements go in the plan) and routes its tokens there through `opts.dispatch`'s transport; works on
    meta-device models (no data moves). Returns the plain shards by parameter name."""
    from torch.distributed.tensor import DTensor, Shard

    ep, rank = mesh.dims.ep, mesh.ep_rank
    local_shards = {}
    layer_names = {id(m): n for n, m in model.named_modules()}
    for layer in moe_layers(model):
        experts = layer.experts
        E = experts.num_experts
        if E % ep:
            raise ConfigError(
                f"parallel.ep={ep} does not divide the {E} experts of a layer; pick a parallel.ep that divides model.num_experts"
            )
        for name in EXPERT_WEIGHTS if ep > 1 else ():  # an EP group of one keeps its experts whole
            p = getattr(experts, name, None)
            if p is None:
                continue
            local = expert_rows(p.data, rank, ep)
            value = DTensor.from_local(local, mesh.ep_mesh, [Shard(0)], run_check=False) if opts.fully_shard else local
            setattr(experts, name, nn.Parameter(value, requires_grad=p.requires_grad))
            if not opts.fully_shard:
                local_shards[f"{layer_names[id(experts)]}.{name}"] = LocalShard((ShardStep(mesh.ep_mesh, 0),))
        layer.dispatcher = build_dispatcher(opts.dispatch, mesh.ep_group, ep, E // ep, layer)
    return local_shards


def _sum_reductions(module) -> None:
    """Reduce gradients by SUM: the engine scales the loss by 1 / `ParallelDims.grad_ranks` instead."""
    module.set_gradient_divide_factor(1.0)
    force = getattr(module, "set_force_sum_reduction_for_comms", None)
    if force is not None:  # gloo has no PREMUL_SUM; plain SUM everywhere
        force(True)


def parallelize(model: nn.Module, mesh: ParallelMesh, opts: ShardingOptions | None = None) -> ParallelPlan:
    """Apply gates' token groups, expert parallelism and FSDP2 to `model` in place (see the module docstring);
    returns the plan: what the optimizer, clipping, counts and export need to know."""
    opts = opts or ShardingOptions()
    for layer in moe_layers(model):
        layer.gate.token_group = mesh.stage_group
    local_shards = {}
    if opts.dispatch.resolved(mesh.dims.ep) != "local":
        local_shards = shard_experts_by_expert(model, mesh, opts)
    plan = ParallelPlan(world=mesh.dims.stage_world, ep=mesh.dims.ep, local_shards=local_shards)
    if mesh.dims.cp > 1:
        plan.sequence_shard = _shard_sequences(model, mesh)
    if opts.fully_shard:
        _fully_shard(model, mesh, opts, plan)
    return plan


def _shard_sequences(model: nn.Module, mesh: ParallelMesh):
    """Context parallelism: every attention layer attends over the whole sequences of its CP group."""
    from .context_parallel import SequenceShard

    shard = SequenceShard(mesh.cp_group, mesh.cp_rank, mesh.dims.cp)
    for module in model.modules():
        if hasattr(module, "sequence_shard"):  # moe.model.Attention's seam
            module.sequence_shard = shard
    for layer in moe_layers(model):  # sequence-level statistics (DeepSeek-V3's balance loss) join the parts
        layer.gate.sequence_group = mesh.cp_group
    return shard


def _fully_shard(model: nn.Module, mesh: ParallelMesh, opts: ShardingOptions, plan: ParallelPlan) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    from torch.distributed.tensor import Shard

    mp = MixedPrecisionPolicy(param_dtype=opts.param_dtype, reduce_dtype=opts.reduce_dtype)
    common = dict(mp_policy=mp, reshard_after_forward=opts.reshard_after_forward)
    units, unsharded_experts = [], []
    for layer in moe_layers(model):
        if mesh.dims.efsdp == 1:
            # nothing to shard them over: they stay this rank's expert shards (an FSDP unit of size 1
            # inside a checkpointed block breaks selective activation checkpointing); gradients are
            # complete after the all-to-all backward, or summed over replicas (`reduce_replicated_expert_grads`)
            unsharded_experts.append(layer.experts)  # model order: the same on every rank
            continue
        # experts already sharded by expert (dim 0) are FSDP-sharded on their model dim: one plain
        # Shard per mesh dim, which every DTensor operation (and a reshard on resume) takes
        placement = (lambda p: Shard(1)) if mesh.dims.ep > 1 else None
        units.append(fully_shard(layer.experts, mesh=mesh.expert_fsdp, shard_placement_fn=placement, **common))
        register_fsdp_forward_method(layer.experts, "forward_routed")  # the fused path's entry point
    ignored = {"ignored_params": {p for e in unsharded_experts for p in e.parameters()}} if unsharded_experts else {}
    blocks = getattr(model, "blocks", ())  # a bare MoE layer in a holder module is one unit (tests)
    for block in blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks:  # a pipeline stage's: by name
        units.append(fully_shard(block, mesh=mesh.dense_fsdp, **ignored, **common))
    units.append(fully_shard(model, mesh=mesh.dense_fsdp, **ignored, **common))
    if unsharded_experts and mesh.dims.dp_replicate > 1:
        plan.replicated_experts = tuple(unsharded_experts)
        plan.replica_group = mesh.experts.get_group("dp_replicate")
    for unit in units:
        _sum_reductions(unit)


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device) -> None:
    """A parallelised meta-device model: allocate this rank's shards on `device` and initialise them
    exactly as the single-process model with the same seed (moeflow.moe.init)."""
    model.to_empty(device=device)
    model.init_weights()
