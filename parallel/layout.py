"""Process-group layout for expert parallelism: world = dp x ep, as a 2-D DeviceMesh.

The mesh is ("dp", "ep") in row-major order, so the ranks of one EP group are
consecutive (0..ep-1, ep..2ep-1, ...): with torchrun's node-major rank order the
all-to-all traffic stays inside a node first. Expert weights are sharded over "ep"
and replicated over "dp" (the expert-data-parallel group); everything else is
replicated over the whole world.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moeflow.moe.errors import ConfigError


def check_layout(ep: int, num_experts: int, world_size: int) -> None:
    """Reject impossible layouts before anything starts, naming the fix."""
    if not isinstance(ep, int) or ep < 1:
        raise ConfigError(
            f"parallel.ep must be a positive integer, got {ep!r}; use parallel.ep=1 for no expert parallelism"
        )
    if ep == 1:
        return
    if num_experts % ep:
        raise ConfigError(
            f"parallel.ep={ep} does not divide model.num_experts={num_experts}; pick an ep that divides the number of experts"
        )
    if world_size % ep:
        hint = (
            f"launch with torchrun --nproc-per-node {ep} (or a multiple)"
            if world_size == 1
            else "pick an ep that divides the world size"
        )
        raise ConfigError(f"parallel.ep={ep} does not divide the world size {world_size}; {hint}")


@dataclass
class ParallelLayout:
    """Who holds which experts and which groups reduce what."""

    mesh: DeviceMesh
    ep: int
    dp: int

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ep")

    @property
    def edp_group(self) -> dist.ProcessGroup:
        """Ranks holding the same expert shard: expert gradients are reduced here."""
        return self.mesh.get_group("dp")

    @property
    def ep_rank(self) -> int:
        return self.mesh.get_local_rank("ep")

    @property
    def world_size(self) -> int:
        return self.ep * self.dp


def build_layout(ep: int, num_experts: int, device_type: str = "cpu") -> ParallelLayout:
    """Build the ("dp", "ep") mesh over the already-initialised default process group."""
    if not dist.is_initialized():
        raise ConfigError("expert parallelism needs torch.distributed; launch with torchrun --nproc-per-node N")
    world = dist.get_world_size()
    check_layout(ep, num_experts, world)
    mesh = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    return ParallelLayout(mesh=mesh, ep=ep, dp=world // ep)
