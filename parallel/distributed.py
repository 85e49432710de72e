"""Process-group setup from the environment torchrun/Slurm/Ray provide."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(
    device_type: str, backend: str = "auto", timeout_s: float | None = None, single_rank_group: bool = False
) -> DistEnv:
    """Join the process group when launched with WORLD_SIZE > 1 (torchrun sets it); every collective
    then waits at most `timeout_s` for its peers (None: torch's default). `single_rank_group`: one
    process still gets a group of one rank (its own store), so it runs the multi-rank code path."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    env = DistEnv(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if (world > 1 or single_rank_group) and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(env.local_rank)
        kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
        if world == 1:
            kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(backend=backend, **kwargs)
    return env


def shutdown_distributed() -> None:
    """Leave together: rank 0 hosts the rendezvous store, so no rank may tear down while another still needs it.
    Garbage is collected first, so that modules the caller has already let go of (FSDP's hooks keep
    them in reference cycles) release their process groups before `destroy_process_group` rather
    than at interpreter exit, where a gloo group's teardown once aborted `moeflow bench ep` (1 run
    in 10). Objects the caller still holds keep their groups until they are freed."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
