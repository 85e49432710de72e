"""Which transport carries tokens between the ranks of an expert-parallel group (`parallel.dispatcher`).

- `alltoall`: NCCL/gloo `all_to_all_single` with uneven splits, dropless; one host read of the
  split sizes per layer forward, none in the backward (`all_to_all.py`).
- `capacity`: equal splits into fixed per-rank buffers sized by `parallel.capacity_factor`;
  overflow is dropped and counted on the device; no host sync at all (`capacity.py`).
- `symm_mem`: NVSHMEM `all_to_all_vdev_2d` into preallocated worst-case buffers, splits
  stay on the GPU, expert-major output; no host sync (`symm_mem.py`). CUDA builds with NVSHMEM only.

`auto` is `alltoall` when parallel.ep > 1 and the local dispatcher otherwise; naming a
transport with ep=1 runs it over an EP group of one rank (the same code path as larger groups).
"""

from __future__ import annotations

from dataclasses import dataclass

from moeflow.moe.errors import ConfigError

DISPATCHERS = ("alltoall", "capacity", "symm_mem")
CHOICES = ("auto", "local", *DISPATCHERS)


@dataclass(frozen=True)
class DispatchOptions:
    name: str = "auto"
    overlap_chunks: int = 1  # alltoall: token chunks whose exchanges overlap other chunks' expert compute
    overlap_shared: bool = False  # alltoall: the shared expert runs while the split sizes travel
    capacity_factor: float = 1.25  # capacity: rows each rank may send each rank, x top_k x tokens / ranks
    capacity_warn_drop: float = 0.01  # capacity: warn once when a layer drops more than this fraction

    def resolved(self, ep: int) -> str:
        if self.name == "auto":
            return "alltoall" if ep > 1 else "local"
        return self.name


def symm_mem_unavailable(device_type: str) -> str | None:
    """Why `symm_mem` cannot run here, or None."""
    if device_type != "cuda":
        return "it needs CUDA GPUs (NVSHMEM); this run is on " + device_type
    try:
        import torch
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError as e:  # pragma: no cover - builds without distributed
        return f"this torch build has no symmetric memory ({e})"
    if not hasattr(torch.ops.symm_mem, "all_to_all_vdev_2d"):
        return f"torch {torch.__version__} has no torch.ops.symm_mem.all_to_all_vdev_2d"
    if not symm_mem.is_nvshmem_available():
        return "NVSHMEM is not available in this torch build or on this machine (libnvshmem_host.so.3 not found)"
    return None


def available(device_type: str) -> list[str]:
    return [n for n in DISPATCHERS if n != "symm_mem" or symm_mem_unavailable(device_type) is None]


def check_options(opts: DispatchOptions, device_type: str, ep: int | None = None) -> None:
    """One-line errors before any work: unknown or unavailable transports, bad capacity numbers
    (`ep`: the EP group size, where known)."""
    if opts.name not in CHOICES:
        raise ConfigError(f"parallel.dispatcher={opts.name!r} is unknown; choose one of: {', '.join(CHOICES)}")
    if opts.name == "symm_mem":
        reason = symm_mem_unavailable(device_type)
        if reason is not None:
            raise ConfigError(
                f"parallel.dispatcher=symm_mem is unavailable: {reason}; available here: {', '.join(available(device_type))}"
            )
        if ep is not None and ep < 2:
            from .symm_mem import SINGLE_RANK

            raise ConfigError(SINGLE_RANK)
    if not opts.capacity_factor > 0:
        raise ConfigError(f"parallel.capacity_factor must be > 0, got {opts.capacity_factor!r}")
    if not 0 <= opts.capacity_warn_drop <= 1:
        raise ConfigError(f"parallel.capacity_warn_drop must be a fraction in [0, 1], got {opts.capacity_warn_drop!r}")
    if opts.overlap_chunks > 1 and opts.name not in ("auto", "alltoall"):
        raise ConfigError(
            f"parallel.overlap_chunks={opts.overlap_chunks} is an alltoall option; parallel.dispatcher={opts.name} takes 1"
        )


def build_dispatcher(opts: DispatchOptions, group, ep: int, num_local: int, layer):
    """The dispatcher of one MoE layer whose experts are this rank's `num_local` of `ep * num_local`."""
    name = opts.resolved(ep)
    if name == "alltoall":
        from .all_to_all import AllToAllDispatcher

        return AllToAllDispatcher(group, ep, num_local, chunks=opts.overlap_chunks, overlap_shared=opts.overlap_shared)
    if name == "capacity":
        from .capacity import CapacityDispatcher

        return CapacityDispatcher(group, ep, num_local, opts.capacity_factor, layer.gate.top_k, opts.capacity_warn_drop)
    if name == "symm_mem":
        from .symm_mem import SymmMemDispatcher

        return SymmMemDispatcher(group, ep, num_local, layer.gate.top_k)
    raise ConfigError(
        f"parallel.dispatcher={name!r} cannot be built over an EP group; choose one of: {', '.join(DISPATCHERS)}"
    )
