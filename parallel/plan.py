"""What parallelising a model did to it: which parameters are experts, and how each shard maps to its full tensor.

`parallelize` returns a `ParallelPlan`, and so does megatron-core's boundary (`megatron_core.megatron_plan`).
Clipping, optimizer groups, parameter counts and full-tensor export ask the plan; nothing else records
sharding. A parameter is sharded in one of two ways, both said by DTensor placements:
- it is a DTensor (FSDP2 and expert parallelism under engine=torch): its own placements say it;
- it is a plain tensor holding one rank's part (engines that reduce gradients themselves, DeepSpeed and
  megatron-core, which take no DTensors): `LocalShard` keeps the placements, `Shard(dim)` over a 1-D mesh
  per step, which `full` and `local` apply with DTensor's own redistribution.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

# the stacked weights of routed experts: every one leads with the expert dim E
EXPERT_WEIGHTS = ("w1_EDF", "w3_EDF", "w2_EFD", "b1_EF", "b3_EF", "b2_ED")

_EXPERT_NAME = re.compile(r"(^|\.)experts\.")


def is_expert(name: str) -> bool:
    """The one test of "routed-expert parameter": its name has an `experts.` component (shared experts
    are dense: they live under `shared_expert.`). Expert parameters reduce their gradients, and shard
    their optimizer state, over other ranks than the dense ones."""
    return bool(_EXPERT_NAME.search(name))


@dataclass(frozen=True)
class ShardStep:
    """One split of a full tensor: `Shard(dim)` over the 1-D `mesh`, of each of `blocks` equal blocks
    stacked along `dim` (megatron's gated fc1 is [w1; w3], each split over the TP ranks)."""

    mesh: object  # a 1-D DeviceMesh
    dim: int
    blocks: int = 1


@dataclass(frozen=True)
class LocalShard:
    """A plain tensor that is this rank's part of a full one: the steps applied in order to the full tensor
    (experts: by expert over "ep", then by hidden unit over "tp")."""

    steps: tuple[ShardStep, ...]

    def ranks_per_copy(self) -> int:
        return math.prod(s.mesh.size() for s in self.steps)


def _split(t: torch.Tensor, step: ShardStep) -> torch.Tensor:
    from torch.distributed.tensor import Shard, distribute_tensor

    blocks = t.chunk(step.blocks, step.dim)
    parts = [
        distribute_tensor(b.contiguous(), step.mesh, [Shard(step.dim)], src_data_rank=None).to_local() for b in blocks
    ]
    return torch.cat(parts, step.dim).clone() if len(parts) > 1 else parts[0].clone()


def _join(t: torch.Tensor, step: ShardStep) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Shard

    blocks = t.chunk(step.blocks, step.dim)
    full = [
        DTensor.from_local(b.contiguous(), step.mesh, [Shard(step.dim)], run_check=False).full_tensor() for b in blocks
    ]
    return torch.cat(full, step.dim) if len(full) > 1 else full[0]


@dataclass
class ParallelPlan:
    """The record `parallelize` (or an engine's boundary) leaves. Global sizes stay on the model itself
    (`GroupedExperts.num_experts` is the model's count; `num_local_experts` is this rank's)."""

    world: int = 1  # ranks holding parts of the same parameters: the world, or one pipeline stage's ranks
    ep: int = 1
    local_shards: dict[str, LocalShard] = field(default_factory=dict)
    # experts FSDP does not manage (efsdp = 1) while the world holds several replicas: their gradients are
    # summed over `replica_group` once per step (`reduce_replicated_expert_grads`)
    replicated_experts: tuple[nn.Module, ...] = ()
    replica_group: object = None
    # context parallelism (parallel.cp > 1): which shard of every sequence this rank holds
    # (`context_parallel.SequenceShard`); the engine feeds the model that shard of its batch
    sequence_shard: object = None

    def copies(self, name: str, t: torch.Tensor) -> int:
        """How many ranks of the world hold each element of parameter `name` (local tensor `t`):
        what a global norm divides each rank's squares by."""
        return copies_in_world(t, self.world, self.local_shards.get(name))

    def full(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The full tensor of parameter `name` from this rank's `t` (its value, gradient or an optimizer
        moment of its shape). Collective over the shard's meshes: call on every rank, in the same order."""
        if hasattr(t, "full_tensor"):
            return t.full_tensor()
        shard = self.local_shards.get(name)
        if shard is None:
            return t
        for step in reversed(shard.steps):
            t = _join(t, step)
        return t

    def local(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full tensor of parameter `name` (no communication)."""
        shard = self.local_shards.get(name)
        if shard is None or not torch.is_tensor(full) or full.dim() == 0:
            return full
        for step in shard.steps:
            full = _split(full, step)
        return full

    def global_numel(self, name: str, p: torch.Tensor) -> int:
        shard = self.local_shards.get(name)
        return p.numel() * (shard.ranks_per_copy() if shard else 1)

    # -- whole state dicts (engines that checkpoint full tensors: megatron-core) ----------------------
    def full_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` (the model's local state dict) with every shard gathered (collective)."""
        out = dict(state)
        for name, _ in model.named_parameters():
            if name in out and name in self.local_shards:
                out[name] = self.full(name, out[name])
        return out

    def local_state(self, full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.local(k, v) for k, v in full_state.items()}

    def full_optimizer_state(self, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
        """`opt.state_dict()` with the moments of sharded parameters gathered (collective)."""
        osd = opt.state_dict()
        for idx, name in enumerate(_param_names(model, opt)):
            if name in self.local_shards and idx in osd["state"]:
                osd["state"][idx] = {k: self._full_moment(name, v) for k, v in osd["state"][idx].items()}
        return osd

    def local_optimizer_state(self, model: nn.Module, opt: torch.optim.Optimizer, full_osd: dict) -> dict:
        state = dict(full_osd["state"])
        for idx, name in enumerate(_param_names(model, opt)):
            if name in self.local_shards and idx in state:
                state[idx] = {k: self.local(name, v) if _is_moment(v) else v for k, v in state[idx].items()}
        return {**full_osd, "state": state}

    def _full_moment(self, name: str, v):
        return self.full(name, v) if _is_moment(v) else v


def copies_in_world(t: torch.Tensor, world: int, shard: LocalShard | None = None) -> int:
    """Ranks of the world holding each element of `t`: a DTensor's replicated mesh dims and the ranks
    outside its mesh (a sub-mesh, e.g. experts sharded over "ep" only); a plain tensor is on every rank,
    unless `shard` says which part of a full one it is."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        outside = world // t.device_mesh.size()
        return outside * math.prod(t.device_mesh.size(i) for i, pl in enumerate(t.placements) if pl.is_replicate())
    return world // shard.ranks_per_copy() if shard else world


def _is_moment(v) -> bool:
    return torch.is_tensor(v) and v.dim() > 0


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in the integer-id order `state_dict()` uses."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def expert_rows(p: torch.Tensor, ep_rank: int, ep: int) -> torch.Tensor:
    """This EP rank's experts [r*E/ep, (r+1)*E/ep) of a stacked expert tensor: megatron's placement too."""
    L = p.shape[0] // ep
    return p[ep_rank * L : (ep_rank + 1) * L].clone()


@torch.no_grad()
def reduce_replicated_expert_grads(plan: ParallelPlan | None) -> None:
    """Sum the gradients of experts that FSDP does not manage over the replicas; call once per optimizer
    step, after the last backward. No-op when there are none."""
    if plan is None or not plan.replicated_experts:
        return
    for p in (p for e in plan.replicated_experts for p in e.parameters()):  # model order: the same on every rank
        if p.grad is not None:
            local = p.grad._local_tensor if hasattr(p.grad, "_local_tensor") else p.grad  # in place
            dist.all_reduce(local, group=plan.replica_group)
