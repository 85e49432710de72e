"""engine=deepspeed with expert parallelism: moeflow's expert shards inside DeepSpeed's MoE groups.

moeflow shards the experts and routes through its all-to-all dispatcher; DeepSpeed's MoE
machinery reduces and ZeRO-partitions the expert parameter groups over its
expert-data-parallel groups, created here through its (private) `deepspeed.utils.groups`
API and checked against moeflow's layout.
"""

from __future__ import annotations

import torch

from moeflow.parallel.mesh import ParallelConfig
from moeflow.parallel.plan import ParallelPlan


def ep_group_name(ep_size: int) -> str:
    """DeepSpeed-MoE's name for the expert-data-parallel group of an EP size."""
    return f"ep_size_{ep_size}"


def to_deepspeed_moe_groups(groups: list[dict], ep: int) -> list[dict]:
    """Mark the expert groups (`launch.optim.optimizer_groups`' `experts_*`) the way DeepSpeed-MoE expects (EP > 1).

    DeepSpeed's ZeRO reduces a group's gradients over `expert_data_parallel_group[name]`
    when the group has `moe: True`, and each of its params `allreduce=False` plus
    `group_name` (what `split_params_into_different_moe_groups_for_optimizer` produces):
    DeepSpeed's own attributes, set here at its boundary.
    """
    out = []
    for g in groups:
        g = dict(g)
        if g["name"].startswith("experts"):
            for p in g["params"]:
                p.allreduce = False
                p.group_name = ep_group_name(ep)
            g.update(moe=True, name=ep_group_name(ep))
        out.append(g)
    return out


def _deepspeed_moe_marker(num_experts: int, ep: int) -> torch.nn.Module:
    """A parameter-free `deepspeed.moe.layer.MoE` that tells DeepSpeed the model has expert parallelism.

    DeepSpeed switches its MoE handling on (`engine.has_moe_layers`: ZeRO-1/2 partition and
    reduce `moe: True` groups over `expert_data_parallel_group[name]`, the gradient norm counts
    each expert once) only when it finds one of its own `MoE` modules in the model, and
    `deepspeed.initialize` takes no flag for it. Of the ways to say so (subclassing its
    engine, setting the flag after initialize — too late, the optimizer is built inside —
    or pretending moeflow's layers are DeepSpeed's), one empty marker per moeflow MoE layer is
    the least intrusive: it owns no parameters (moeflow's experts stay where they are), it
    creates no groups (`shard_experts_for_deepspeed` created them), and with
    `num_local_experts = 0` DeepSpeed writes and reads no per-expert checkpoint files; the
    expert weights live in ZeRO's fp32 partitions (see `resume` and `convert_to_moeflow`).
    """
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoEMarker(MoE):
        def __init__(self):
            torch.nn.Module.__init__(self)  # not MoE.__init__: no DeepSpeed gate or experts
            self.num_experts, self.ep_size, self.use_residual = num_experts, ep, False
            self.expert_group_name = ep_group_name(ep)
            self.num_local_experts = 0  # no layer_*_expert_*_model_states.pt files

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # groups already created, consistent with moeflow's layout

        def forward(self, *args):
            raise RuntimeError("DeepSpeedMoEMarker only marks a moeflow MoE layer for DeepSpeed; it does not compute")

    return DeepSpeedMoEMarker()


def shard_experts_for_deepspeed(model: torch.nn.Module, parallel_cfg: ParallelConfig, device_type: str) -> ParallelPlan:
    """moeflow's expert parallelism (expert shards, all-to-all dispatcher) with DeepSpeed's groups; with
    parallel.ep=1 only the gates' token groups (the global batch, like engine=torch).

    `parallelize` without FSDP (`fully_shard=False`: the expert shards stay plain tensors, the plan
    records their placement): DeepSpeed reduces the gradients. Its expert-parallel groups are
    consecutive ranks and its expert-data-parallel groups strided ones
    (`groups._create_expert_and_data_parallel`, E + D order), which is the mesh's ("efsdp", "ep")
    expert grid; checked here. Gradient scale: ZeRO divides every gradient by the data-parallel world
    size and sums expert gradients over the expert-data-parallel group: the single-process model's
    gradients (the sum over every rank's batch, divided by the world).
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import groups

    from moeflow.parallel.mesh import ParallelDims, build_mesh
    from moeflow.parallel.parallelize import ShardingOptions, parallelize

    ep = parallel_cfg.ep
    mesh = build_mesh(ParallelDims(world=dist.get_world_size(), ep=ep), device_type)
    plan = parallelize(model, mesh, ShardingOptions(dispatch=parallel_cfg.dispatch(), fully_shard=False))
    if ep == 1:
        return plan  # no expert groups: DeepSpeed reduces every gradient over the world
    name = ep_group_name(ep)
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing process group (deepspeed.comm)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)
    for ours, theirs in (
        (mesh.ep_group, groups._get_expert_parallel_group(name)),
        (mesh.experts.get_group("efsdp"), groups._get_expert_data_parallel_group(name)),
    ):
        if dist.get_process_group_ranks(ours) != dist.get_process_group_ranks(theirs):
            raise RuntimeError(
                f"DeepSpeed's {name} groups {dist.get_process_group_ranks(theirs)} differ from moeflow's {dist.get_process_group_ranks(ours)}"
            )
    for layer in model.moe_layers():
        layer.add_module("deepspeed_moe_marker", _deepspeed_moe_marker(model.cfg.num_experts, ep))
    return plan
