"""The all-to-all dispatcher: tokens travel to the rank that holds their expert and back.

Same call signature as `moeflow.moe.dispatch.LocalDispatcher`. Per forward:
plan by (global) expert -> count rows per destination rank -> exchange counts ->
`all_to_all_single` with uneven splits -> re-group the received rows by local expert ->
`experts(x_AD, counts_E)` (any implementation) -> send the outputs back -> `combine`.
Gradients flow back through both exchanges (the backward of an exchange is the
exchange with the splits swapped).

Overlap (`chunks > 1`, `overlap_shared`): the assignments are split into token chunks
whose exchanges are all launched asynchronously up front; each chunk's expert compute
starts as soon as its rows arrived, while later chunks are still in flight, and its
outputs are sent back asynchronously. With `overlap_shared` the layer's shared expert runs
while the first exchange is in flight (else after the exchanges). Only the forward overlaps; the backward
exchanges run synchronously in autograd's order.

Shape suffixes: T tokens, D model dim, A assignments/rows, E global experts,
L local experts, R ranks of the EP group, C chunks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from moeflow.moe.dispatch import DispatchPlan, combine, plan_dispatch
from moeflow.moe.gates.base import RouterOutput
from moeflow.moe.gates.common import stable_order


class _Exchange(torch.autograd.Function):
    """all_to_all_single of rows with uneven splits; backward is the reverse exchange.

    With `pending` (a list) the forward is launched asynchronously and its work handle
    appended: the caller must `wait()` before reading the output.
    """

    @staticmethod
    def forward(ctx, x_AD, out_splits, in_splits, group, pending):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out_AD = x_AD.new_empty(sum(out_splits), x_AD.shape[1])
        work = dist.all_to_all_single(out_AD, x_AD.contiguous(), out_splits, in_splits, group=group, async_op=pending is not None)
        if pending is not None:
            pending.append(work)
        return out_AD

    @staticmethod
    def backward(ctx, g_AD):
        out_splits, in_splits = ctx.splits
        g_in = g_AD.new_empty(sum(in_splits), g_AD.shape[1])
        dist.all_to_all_single(g_in, g_AD.contiguous(), in_splits, out_splits, group=ctx.group)
        return g_in, None, None, None, None


def exchange(x_AD, out_splits: list[int], in_splits: list[int], group, pending: list | None = None) -> torch.Tensor:
    return _Exchange.apply(x_AD, out_splits, in_splits, group, pending)


class AllToAllDispatcher:
    """Experts e in [rank * L, (rank + 1) * L) live on EP rank `rank` (L = E / R)."""

    def __init__(self, group: dist.ProcessGroup, ep_size: int, num_local_experts: int, chunks: int = 1, overlap_shared: bool = False):
        if chunks < 1:
            raise ValueError(f"parallel.overlap_chunks must be >= 1, got {chunks}")
        self.group, self.ep_size, self.num_local = group, ep_size, num_local_experts
        self.chunks = chunks
        self.overlap_shared = overlap_shared  # run the shared expert while the first exchange is in flight
        self.last_exchange_rows = (0, 0)  # (rows sent, rows received) of the last forward
        self.last_splits = ([], [])  # per chunk: rows to / from each rank, for benchmarks

    def __call__(self, x_TD: torch.Tensor, routing: RouterOutput, experts, shared_expert=None) -> torch.Tensor:
        R, L, C = self.ep_size, self.num_local, self.chunks
        E = routing.num_experts
        if E != R * L:
            raise ValueError(f"the gate routes to {E} experts but {R} ranks x {L} local experts are {R * L}")
        plan = plan_dispatch(routing)
        T = plan.num_tokens
        # Chunk of each assignment by its token (contiguous token ranges); counts per (chunk, expert).
        chunk_A = (plan.token_A * C) // max(T, 1)
        counts_CE = torch.bincount(chunk_A * E + plan.expert_A, minlength=C * E).view(C, E)
        send_RCL = counts_CE.view(C, R, L).permute(1, 0, 2).contiguous()
        recv_RCL = torch.empty_like(send_RCL)
        dist.all_to_all_single(recv_RCL.view(-1), send_RCL.view(-1), group=self.group)
        in_splits_CR = send_RCL.sum(2).t().tolist()  # rows to each rank, per chunk
        out_splits_CR = recv_RCL.sum(2).t().tolist()  # rows from each rank, per chunk
        recv_CRL = recv_RCL.permute(1, 0, 2)

        in_flight_shared = shared_expert if self.overlap_shared else None
        overlap = C > 1 or in_flight_shared is not None
        # Assignments sorted by (chunk, expert): a stable sort of the expert-sorted plan by chunk.
        by_chunk_A = stable_order(chunk_A, C)
        rows_AD = x_TD[plan.token_A[by_chunk_A]]
        send_sizes = counts_CE.sum(1).tolist()
        sent_CAD = torch.split(rows_AD, send_sizes)
        pending_in: list = []
        recv_AD = [exchange(sent_CAD[c], out_splits_CR[c], in_splits_CR[c], self.group, pending_in if overlap else None) for c in range(C)]
        shared_TD = in_flight_shared(x_TD) if in_flight_shared is not None else None

        pending_out: list = []
        back_AD = []
        for c in range(C):
            if overlap:
                pending_in[c].wait()
            y_AD = self._local_experts(recv_AD[c], recv_CRL[c], experts)
            back_AD.append(exchange(y_AD, in_splits_CR[c], out_splits_CR[c], self.group, pending_out if overlap else None))
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

    def _local_experts(self, recv_AD: torch.Tensor, recv_RL: torch.Tensor, experts) -> torch.Tensor:
        """Received rows are ordered (source rank, local expert): group them by local expert,
        run the experts, and put the outputs back in received order."""
        L = self.num_local
        local_expert_A = torch.repeat_interleave(torch.arange(L, device=recv_AD.device).repeat(self.ep_size), recv_RL.reshape(-1), output_size=recv_AD.shape[0])
        order_A = stable_order(local_expert_A, L)
        counts_L = recv_RL.sum(0)
        if getattr(experts, "fuses_permute", False):
            # A weight-1 "combine" onto the received rows is exactly the inverse permutation.
            local_plan = DispatchPlan(order_A, recv_AD.new_ones(order_A.shape[0]), local_expert_A[order_A], counts_L, recv_AD.shape[0])
            return experts.forward_routed(recv_AD, local_plan)
        y_AD = experts(recv_AD[order_A], counts_L)
        inverse_A = torch.empty_like(order_A)
        inverse_A[order_A] = torch.arange(order_A.shape[0], device=order_A.device)
        return y_AD[inverse_A]
