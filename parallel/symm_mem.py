"""The symmetric-memory dispatcher: NVSHMEM moves the rows and the split sizes never leave the GPU.

torch's `symm_mem.all_to_all_vdev_2d` reads the per-(rank, expert) split sizes on the device,
sends rank-major rows and lands them expert-major (every local expert's rows from every
source rank together, each group starting on a multiple of ALIGN rows), which is what the
grouped GEMM wants; `all_to_all_vdev_2d_offset` is the way back. Nothing the host does waits
for the GPU, so the host can queue the next layers while this one is in flight.

The price is memory: receive buffers must hold the worst case (every rank sends this rank all
of its rows: ranks x tokens x top_k rows, plus ALIGN per expert), they live in symmetric memory,
and each MoE layer keeps its own (they hold the layer's activations until its backward).
Rows between and past the groups are never sent; they keep finite stale values, their
outputs are never read, and their gradients are zeroed before each backward exchange.

Limits of torch's kernels: at most 16 local experts and 16 ranks per EP group; the gate
may emit at most tokens x top_k assignments (checked on the host, from the shapes).

Shape suffixes: T tokens, D model dim, A assignments, R ranks, L local experts,
N rows of a worst-case receive buffer (R * T * top_k + L * ALIGN).
"""

from __future__ import annotations

import torch

from moeflow.moe.errors import ConfigError
from moeflow.moe.routing import RouterOutput, combine, plan_dispatch

ALIGN = 16  # rows: where each local expert's group starts in the receive buffer
MAX_LOCAL_EXPERTS = 16  # torch's all_to_all_vdev_2d: one 32-thread tile per local expert, 16 tiles
MAX_RANKS = 16


class _Buffers:
    """One layer's symmetric buffers for one (tokens, dim, dtype); allocation is collective."""

    def __init__(self, R: int, L: int, A_max: int, D: int, dtype, device, group_name: str):
        import torch.distributed._symmetric_memory as symm_mem

        N = R * A_max + L * ALIGN
        self.A_max, self.N = A_max, N

        def empty(*shape, dtype=dtype):
            t = symm_mem.empty(*shape, dtype=dtype, device=device)
            symm_mem.rendezvous(t, group_name)
            return t

        self.send = empty(A_max, D).zero_()  # dispatch input; the combine's gradient input
        self.recv = empty(N, D).zero_()  # dispatch output (the experts' input, kept for their backward)
        self.grad_recv = empty(N, D).zero_()  # the combine's gradient output (the experts' output gradient)
        self.expert_out = empty(N, D).zero_()  # combine input; the dispatch's gradient input
        self.back = empty(A_max, D).zero_()  # combine output; the dispatch's gradient output
        self.in_splits = empty(R * L, dtype=torch.int64)
        self.recv_splits_offsets = empty(2, R * L, dtype=torch.int64)  # kept until the backward
        self.scratch_splits_offsets = empty(2, R * L, dtype=torch.int64)


def _vdev_2d(src, dst, in_splits, out_splits_offsets, group_name):
    torch.ops.symm_mem.all_to_all_vdev_2d(src, dst, in_splits, out_splits_offsets, group_name, major_align=ALIGN)


def _vdev_2d_back(src, dst, in_splits_offsets, out_splits_offsets, group_name):
    torch.ops.symm_mem.all_to_all_vdev_2d_offset(src, dst, in_splits_offsets, out_splits_offsets, group_name)


class _Dispatch(torch.autograd.Function):
    """Rank-major rows (grouped by global expert) -> expert-major worst-case buffer."""

    @staticmethod
    def forward(ctx, rows_AD, counts_E, bufs: _Buffers, group_name: str):
        A = rows_AD.shape[0]
        bufs.send[:A].copy_(rows_AD)
        bufs.in_splits.copy_(counts_E)
        _vdev_2d(bufs.send, bufs.recv, bufs.in_splits, bufs.recv_splits_offsets, group_name)
        ctx.bufs, ctx.group_name, ctx.A = bufs, group_name, A
        return bufs.recv.detach()  # a fresh alias: autograd marks it, not the buffer itself

    @staticmethod
    def backward(ctx, g_ND):
        bufs = ctx.bufs
        bufs.expert_out.copy_(g_ND)
        _vdev_2d_back(bufs.expert_out, bufs.back, bufs.recv_splits_offsets, bufs.scratch_splits_offsets, ctx.group_name)
        return bufs.back[: ctx.A].clone(), None, None, None


class _Combine(torch.autograd.Function):
    """Expert-major outputs -> back to their source ranks, in the rows' original order."""

    @staticmethod
    def forward(ctx, y_ND, A: int, bufs: _Buffers, group_name: str):
        bufs.expert_out.copy_(y_ND)
        _vdev_2d_back(bufs.expert_out, bufs.back, bufs.recv_splits_offsets, bufs.scratch_splits_offsets, group_name)
        ctx.bufs, ctx.group_name, ctx.A = bufs, group_name, A
        return bufs.back[:A].clone()

    @staticmethod
    def backward(ctx, g_AD):
        bufs = ctx.bufs
        bufs.send[: ctx.A].copy_(g_AD)
        bufs.grad_recv.zero_()  # pad rows get no gradient
        _vdev_2d(bufs.send, bufs.grad_recv, bufs.in_splits, bufs.scratch_splits_offsets, ctx.group_name)
        return bufs.grad_recv.detach(), None, None, None


def _use_nvshmem(symm_mem, group_name: str) -> None:
    """all_to_all_vdev_2d runs on NVSHMEM-allocated buffers only ("NYI" otherwise), and torch's
    default symmetric-memory backend is CUDA: choose NVSHMEM before the first allocation."""
    if hasattr(symm_mem, "set_backend"):
        if symm_mem.get_backend(torch.device("cuda")) != "NVSHMEM":
            try:
                symm_mem.set_backend("NVSHMEM")
            except RuntimeError as e:
                raise ConfigError(
                    f"parallel.dispatcher=symm_mem needs NVSHMEM symmetric memory, but this process already allocated "
                    f"symmetric memory with another backend ({e}); use parallel.dispatcher=alltoall"
                ) from None
    elif hasattr(symm_mem, "enable_symm_mem_for_group"):  # older torch: NVSHMEM by default, per-group opt-in
        symm_mem.enable_symm_mem_for_group(group_name)


SINGLE_RANK = (
    "parallel.dispatcher=symm_mem needs an EP group of at least 2 ranks (torch's NVSHMEM all_to_all_vdev_2d "
    "refuses a group of one); with parallel.ep=1 use parallel.dispatcher=alltoall or capacity"
)


class SymmMemDispatcher:
    def __init__(self, group, ep_size: int, num_local_experts: int, top_k: int):
        if num_local_experts > MAX_LOCAL_EXPERTS:
            raise ConfigError(
                f"parallel.dispatcher=symm_mem takes at most {MAX_LOCAL_EXPERTS} experts per rank (torch's all_to_all_vdev_2d); "
                f"this layer has {num_local_experts}: raise parallel.ep or use parallel.dispatcher=alltoall"
            )
        if ep_size < 2:
            raise ConfigError(SINGLE_RANK)
        if ep_size > MAX_RANKS:
            raise ConfigError(
                f"parallel.dispatcher=symm_mem takes EP groups of at most {MAX_RANKS} ranks; parallel.ep={ep_size}"
            )
        self.group, self.ep_size, self.num_local, self.top_k = group, ep_size, num_local_experts, int(top_k)
        self.group_name = group.group_name
        self.host_syncs = 0  # stays 0
        self._bufs: dict[tuple, _Buffers] = {}
        self._last: _Buffers | None = None

    def exchange_plan(self) -> tuple[list[list[int]], list[list[int]]]:
        """Rows to and from each rank of the last forward, read from the device (benchmarks only: a host sync)."""
        R, L = self.ep_size, self.num_local
        sent = self._last.in_splits.view(R, L).sum(1).tolist()
        received = self._last.recv_splits_offsets[0].view(L, R).sum(0).tolist()
        return [sent], [received]

    def _buffers(self, T: int, x_TD: torch.Tensor) -> _Buffers:
        key = (T, x_TD.shape[1], x_TD.dtype, x_TD.device)
        if key not in self._bufs:
            import torch.distributed._symmetric_memory as symm_mem

            _use_nvshmem(symm_mem, self.group_name)
            self._bufs[key] = _Buffers(
                self.ep_size, self.num_local, T * self.top_k, x_TD.shape[1], x_TD.dtype, x_TD.device, self.group_name
            )
        return self._bufs[key]

    def __call__(self, x_TD: torch.Tensor, routing: RouterOutput, experts, shared_expert=None) -> torch.Tensor:
        R, L = self.ep_size, self.num_local
        if routing.num_experts != R * L:
            raise ValueError(
                f"the gate routes to {routing.num_experts} experts but {R} ranks x {L} local experts are {R * L}"
            )
        plan = plan_dispatch(routing)  # grouped by global expert = rank-major, as the exchange sends
        T, A = x_TD.shape[0], plan.token_A.shape[0]
        if A > T * self.top_k:
            raise ConfigError(
                f"parallel.dispatcher=symm_mem: the gate emitted {A} assignments for {T} tokens, more than top_k={self.top_k} each "
                "(its buffers hold tokens x top_k); use parallel.dispatcher=alltoall with this gate"
            )
        bufs = self._buffers(T, x_TD)
        self._last = bufs
        recv_ND = _Dispatch.apply(x_TD[plan.token_A], plan.counts_E, bufs, self.group_name)
        shared_TD = shared_expert(x_TD) if shared_expert is not None else None
        # each local expert's group: its rows from every rank, padded to ALIGN (at least ALIGN when empty)
        received_L = bufs.recv_splits_offsets[0].view(L, R).sum(1)
        padded_L = torch.clamp(((received_L + ALIGN - 1) // ALIGN) * ALIGN, min=ALIGN)
        y_ND = experts(recv_ND, padded_L)
        y_AD = _Combine.apply(y_ND, A, bufs, self.group_name)
        y_TD = combine(y_AD, plan)
        return y_TD + shared_TD if shared_TD is not None else y_TD
