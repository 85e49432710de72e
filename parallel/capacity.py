"""The capacity dispatcher: fixed-size exchanges, so the host never waits for the GPU.

Every rank may send every rank of its EP group at most `capacity` rows per forward,
capacity = ceil(capacity_factor * tokens * top_k / ranks) (top_k: the gate's assignments per
token; every rank of a group routes the same number of tokens, as a training step does).
The rows bound for rank r fill slots [r * capacity, (r + 1) * capacity) of one send buffer in
token order; what does not fit is dropped (the pair adds nothing, like a capacity gate's
dropped pair) and counted on the device. Both exchanges (rows there, outputs back) are
equal-split `all_to_all_single`s, the receiver learns each row's local expert from a second,
integer exchange, and unused slots are zero rows that the last local expert computes and
nobody reads. No split size ever reaches the host.

`last_stats["dispatch_dropped_fraction"]` (a device scalar) is logged with the routing
statistics; `drop_warning` words the warning the trainer shows once when it exceeds `warn_drop`.

Shape suffixes: T tokens, D model dim, A assignments, S assignments in slot order,
R ranks of the EP group, L local experts, B send/receive slots (R * capacity).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from moeflow.moe.routing import DispatchPlan, RouterOutput, combine, counts_of

from .all_to_all import run_local_experts
from .exchange import exchange


class CapacityDispatcher:
    def __init__(
        self, group, ep_size: int, num_local_experts: int, capacity_factor: float, top_k: int, warn_drop: float = 0.01
    ):
        self.group, self.ep_size, self.num_local = group, ep_size, num_local_experts
        self.capacity_factor, self.top_k, self.warn_drop = float(capacity_factor), int(top_k), float(warn_drop)
        self.last_stats: dict[str, torch.Tensor] = {}
        self.host_syncs = 0  # stays 0: nothing here reads the device
        self.last_capacity = 0

    def capacity(self, num_tokens: int) -> int:
        """Rows this rank may send each rank (and receive from each)."""
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.ep_size))

    def __call__(self, x_TD: torch.Tensor, routing: RouterOutput, experts, shared_expert=None) -> torch.Tensor:
        R, L = self.ep_size, self.num_local
        if routing.num_experts != R * L:
            raise ValueError(
                f"the gate routes to {routing.num_experts} experts but {R} ranks x {L} local experts are {R * L}"
            )
        T, D = x_TD.shape
        cap = self.capacity(T)
        B = R * cap
        dest_A = routing.expert_A // L
        # slot order: by destination rank, then by token (a full buffer drops the latest tokens)
        order_S = torch.argsort(dest_A * max(T, 1) + routing.token_A, stable=True)
        token_S, expert_S, dest_S = routing.token_A[order_S], routing.expert_A[order_S], dest_A[order_S]
        weight_S = routing.weight_A.index_select(0, order_S)
        n_R = counts_of(dest_S, R)
        slot_S = torch.arange(token_S.shape[0], device=x_TD.device) - (torch.cumsum(n_R, 0) - n_R)[dest_S]
        kept_S = slot_S < cap
        buf_S = torch.where(kept_S, dest_S * cap + slot_S, B)  # row B: where dropped pairs go (thrown away)

        send_BD = x_TD.new_zeros(B + 1, D).index_copy(0, buf_S, x_TD[token_S])[:B]
        expert_B = torch.full((B + 1,), L, dtype=torch.int64, device=x_TD.device).index_copy(0, buf_S, expert_S % L)[:B]
        recv_expert_B = torch.empty_like(expert_B)
        dist.all_to_all_single(recv_expert_B, expert_B, group=self.group)
        splits = [cap] * R
        recv_BD = exchange(send_BD, splits, splits, self.group)
        shared_TD = shared_expert(x_TD) if shared_expert is not None else None  # queued behind the exchange

        y_BD = self._local_experts(recv_BD, recv_expert_B, experts)
        back_BD = exchange(y_BD, splits, splits, self.group)
        # dropped pairs read the zero row appended at B
        y_SD = torch.cat([back_BD, back_BD.new_zeros(1, D)]).index_select(0, buf_S)
        y_TD = combine(y_SD, DispatchPlan(token_S, weight_S, expert_S, counts_of(expert_S, R * L), T))
        A = token_S.shape[0]
        self.last_capacity = cap
        self.last_stats = {"dispatch_dropped_fraction": (A - kept_S.sum()).float().detach() / max(A, 1)}
        return y_TD + shared_TD if shared_TD is not None else y_TD

    def exchange_plan(self) -> tuple[list[list[int]], list[list[int]]]:
        """Rows to and from each rank of the last forward (equal splits, padding included), for benchmarks."""
        return [[self.last_capacity] * self.ep_size], [[self.last_capacity] * self.ep_size]

    def _local_experts(self, recv_BD: torch.Tensor, recv_expert_B: torch.Tensor, experts) -> torch.Tensor:
        """Group the received slots by local expert (empty slots, marked L, join the last expert's
        group: zero rows, outputs nobody reads), run the experts, return outputs in slot order."""
        L = self.num_local
        local_B = recv_expert_B.clamp(max=L - 1)
        return run_local_experts(recv_BD, local_B, counts_of(local_B, L), experts)

    def drop_warning(self, fraction: float, layer: int, step: int) -> str | None:
        """The warning (with the numbers) when a layer dropped more than `warn_drop` of its pairs; the
        trainer shows the first one of a run."""
        if fraction <= self.warn_drop:
            return None
        return (
            f"parallel.dispatcher=capacity dropped {fraction:.1%} of the token-expert pairs of MoE layer {layer} at step {step} "
            f"(parallel.capacity_factor={self.capacity_factor:g}, more than parallel.capacity_warn_drop={self.warn_drop:g}); "
            f"raise parallel.capacity_factor or use parallel.dispatcher=alltoall (dropless)"
        )
