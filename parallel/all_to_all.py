"""The all-to-all dispatcher: tokens travel to the rank that holds their expert and back.

Same call signature as `moeflow.moe.dispatch.LocalDispatcher`. Per forward:
plan by (global) expert -> count rows per destination rank -> exchange counts ->
`all_to_all_single` with uneven splits -> re-group the received rows by local expert ->
`experts(x_AD, counts_E)` (any implementation) -> send the outputs back -> `combine`.
Gradients flow back through both exchanges (the backward of an exchange is the
exchange with the splits swapped).

Host work: one read per forward (the split sizes, copied to the host on the side while the
GPU goes on; with `overlap_shared` the shared expert runs during that wait), none in the
backward (its splits are the forward's). The exchanges are the `moeflow::all_to_all` custom op
(`exchange.py`): selective activation checkpointing keeps their outputs.

Overlap (`chunks > 1`): the assignments are split into token chunks whose exchanges are all
launched asynchronously up front; each chunk's expert compute starts as soon as its rows
arrived, while later chunks are still in flight, and its outputs are sent back
asynchronously. Only the forward overlaps; the backward exchanges run in autograd's order.

Shape suffixes: T tokens, D model dim, A assignments/rows, E global experts,
L local experts, R ranks of the EP group, C chunks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeflow.moe.errors import ConfigError
from moeflow.moe.routing import DispatchPlan, RouterOutput, combine, counts_of, plan_dispatch, stable_order

from .exchange import exchange, exchange_async


def _to_host_later(t: torch.Tensor):
    """Start copying `t` to the host without waiting; the returned function waits and gives its list."""
    if t.device.type != "cuda":
        return t.tolist
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def wait() -> list:
        done.synchronize()
        return host.tolist()

    return wait


class AllToAllDispatcher:
    """Experts e in [rank * L, (rank + 1) * L) live on EP rank `rank` (L = E / R)."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        ep_size: int,
        num_local_experts: int,
        chunks: int = 1,
        overlap_shared: bool = False,
    ):
        if chunks < 1:
            raise ConfigError(
                f"parallel.overlap_chunks must be >= 1, got {chunks}; set parallel.overlap_chunks=1 (no overlap) or more"
            )
        self.group, self.ep_size, self.num_local = group, ep_size, num_local_experts
        self.chunks = chunks
        self.overlap_shared = overlap_shared  # run the shared expert while the first exchange is in flight
        self.last_exchange_rows = (0, 0)  # (rows sent, rows received) of the last forward
        self.last_splits = ([], [])  # per chunk: rows to / from each rank, for benchmarks
        self.host_syncs = 0  # host reads so far: one per forward (the split sizes), none in the backward

    def __call__(self, x_TD: torch.Tensor, routing: RouterOutput, experts, shared_expert=None) -> torch.Tensor:
        R, L, C = self.ep_size, self.num_local, self.chunks
        E = routing.num_experts
        if E != R * L:
            raise ValueError(f"the gate routes to {E} experts but {R} ranks x {L} local experts are {R * L}")
        plan = plan_dispatch(routing)
        T = plan.num_tokens
        # Chunk of each assignment by its token (contiguous token ranges); counts per (chunk, expert), on the device.
        chunk_A = (plan.token_A * C) // max(T, 1)
        counts_CE = counts_of(chunk_A * E + plan.expert_A, C * E).view(C, E)
        send_RCL = counts_CE.view(C, R, L).permute(1, 0, 2).contiguous()
        recv_RCL = torch.empty_like(send_RCL)
        dist.all_to_all_single(recv_RCL.view(-1), send_RCL.view(-1), group=self.group)
        recv_CRL = recv_RCL.permute(1, 0, 2)
        # The one host read of the forward: rows to and from each rank, per chunk. It is copied on the
        # side while the GPU goes on (the shared expert runs meanwhile when it overlaps).
        splits = _to_host_later(torch.cat([send_RCL.sum(2).t().reshape(-1), recv_RCL.sum(2).t().reshape(-1)]))
        in_flight_shared = shared_expert if self.overlap_shared else None
        shared_TD = in_flight_shared(x_TD) if in_flight_shared is not None else None
        both = splits()
        in_splits_CR = [both[c * R : (c + 1) * R] for c in range(C)]  # rows to each rank, per chunk
        out_splits_CR = [both[C * R + c * R : C * R + (c + 1) * R] for c in range(C)]  # rows from each rank, per chunk
        self.host_syncs += 1

        overlap = C > 1
        # Assignments sorted by (chunk, expert): a stable sort of the expert-sorted plan by chunk.
        by_chunk_A = stable_order(chunk_A, C)
        rows_AD = x_TD[plan.token_A[by_chunk_A]]
        send_sizes = [sum(r) for r in in_splits_CR]
        sent_CAD = torch.split(rows_AD, send_sizes)
        pending_in: list = []
        if overlap:
            recv_AD = [
                exchange_async(sent_CAD[c], out_splits_CR[c], in_splits_CR[c], self.group, pending_in) for c in range(C)
            ]
        else:
            recv_AD = [exchange(sent_CAD[0], out_splits_CR[0], in_splits_CR[0], self.group)]

        pending_out: list = []
        back_AD = []
        for c in range(C):
            if overlap:
                pending_in[c].wait()
            y_AD = self._local_experts(recv_AD[c], recv_CRL[c], experts)
            if overlap:
                back_AD.append(exchange_async(y_AD, in_splits_CR[c], out_splits_CR[c], self.group, pending_out))
            else:
                back_AD.append(exchange(y_AD, in_splits_CR[c], out_splits_CR[c], self.group))
        for work in pending_out:
            work.wait()
        y_AD = torch.cat(back_AD) if C > 1 else back_AD[0]
        self.last_exchange_rows = (sum(send_sizes), sum(map(sum, out_splits_CR)))
        self.last_splits = (in_splits_CR, out_splits_CR)

        sorted_plan = DispatchPlan(
            token_A=plan.token_A[by_chunk_A],
            weight_A=plan.weight_A[by_chunk_A],
            expert_A=plan.expert_A[by_chunk_A],
            counts_E=plan.counts_E,
            num_tokens=T,
        )
        y_TD = combine(y_AD, sorted_plan)
        if shared_expert is not None:
            y_TD = y_TD + (shared_TD if shared_TD is not None else shared_expert(x_TD))
        return y_TD

    def exchange_plan(self) -> tuple[list[list[int]], list[list[int]]]:
        """Rows to and from each rank, per chunk, of the last forward (for benchmarks)."""
        return self.last_splits

    def _local_experts(self, recv_AD: torch.Tensor, recv_RL: torch.Tensor, experts) -> torch.Tensor:
        """Received rows are ordered (source rank, local expert): run them through their experts."""
        L = self.num_local
        local_expert_A = torch.repeat_interleave(
            torch.arange(L, device=recv_AD.device).repeat(self.ep_size),
            recv_RL.reshape(-1),
            output_size=recv_AD.shape[0],
        )
        return run_local_experts(recv_AD, local_expert_A, recv_RL.sum(0), experts)


def run_local_experts(
    recv_AD: torch.Tensor, local_expert_A: torch.Tensor, counts_L: torch.Tensor, experts
) -> torch.Tensor:
    """Group received rows by their local expert, run the experts, and return the outputs in
    received order (every dispatcher that moves rows between ranks ends its trip here)."""
    L = counts_L.shape[0]
    order_A = stable_order(local_expert_A, L)
    if getattr(experts, "fuses_permute", False):
        # A weight-1 "combine" onto the received rows is exactly the inverse permutation.
        local_plan = DispatchPlan(
            order_A, recv_AD.new_ones(order_A.shape[0]), local_expert_A[order_A], counts_L, recv_AD.shape[0]
        )
        return experts.forward_routed(recv_AD, local_plan)
    y_AD = experts(recv_AD[order_A], counts_L)
    inverse_A = torch.empty_like(order_A)
    inverse_A[order_A] = torch.arange(order_A.shape[0], device=order_A.device)
    return y_AD[inverse_A]
