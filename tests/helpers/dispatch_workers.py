"""Workers for the dispatcher tests: every transport against the single-process layer (gloo, float64).

Each case builds one MoE layer from one seed on every rank, keeps a single-process reference
that sees the whole global batch, routes this rank's slice through `parallelize` (FSDP2 + EP on
engine=torch's mesh, `dispatch=...`), and returns the largest differences of outputs, input gradients and every
parameter gradient. For `capacity` with a small factor the reference drops the same pairs,
decided here by a plain loop (per source rank and destination rank, the first `capacity`
pairs in token order), independently of the dispatcher's vectorised bookkeeping.
"""

from __future__ import annotations

import copy
import math

import torch

from helpers.ep_workers import D, E, Holder, K, _maxdiff, _param_diffs, build_layer, parallel_copy
from moeflow.moe.dispatch import LocalDispatcher
from moeflow.moe.gates import GATES
from moeflow.parallel import DispatchOptions


class DroppingReference:
    """The local dispatcher on the pairs a capacity dispatcher over `world` ranks would keep."""

    def __init__(self, world: int, ep: int, capacity: int):
        self.world, self.ep, self.capacity = world, ep, capacity
        self.kept_fraction = None

    def __call__(self, x_TD, routing, experts, shared_expert=None):
        T, L = x_TD.shape[0], E // self.ep
        per_rank = T // self.world
        token, expert = routing.token_A.tolist(), routing.expert_A.tolist()
        src = [t // per_rank for t in token]
        group = [s // self.ep for s in src]  # the EP group of the source rank (ep x dp layouts)
        dest = [e // L for e in expert]
        used: dict[tuple, int] = {}
        keep = [False] * len(token)
        for a in sorted(range(len(token)), key=lambda a: (src[a], dest[a], token[a])):
            key = (group[a], src[a], dest[a])
            if used.get(key, 0) < self.capacity:
                used[key] = used.get(key, 0) + 1
                keep[a] = True
        mask = torch.tensor(keep, dtype=torch.bool)
        self.kept_fraction = mask.double().mean().item() if len(keep) else 1.0
        routing.token_A, routing.expert_A, routing.weight_A = (
            routing.token_A[mask],
            routing.expert_A[mask],
            routing.weight_A[mask],
        )
        return LocalDispatcher()(x_TD, routing, experts, shared_expert)


def dispatch_cases(rank: int, world: int, cases: list[tuple]) -> dict:
    """cases: (name, ep, gate_name, dispatcher, capacity_factor). Returns name -> differences."""
    results = {}
    for name, ep, gate_name, transport, factor in cases:
        if gate_name not in GATES and gate_name != "skewed":
            continue
        torch.manual_seed(1234)
        layer = build_layer(gate_name, shared=True)
        ref = copy.deepcopy(layer)
        T = 12 * world
        gen = torch.Generator().manual_seed(99)
        x_TD = torch.randn(T, D, generator=gen, dtype=torch.float64)
        g_TD = torch.randn(T, D, generator=gen, dtype=torch.float64)
        ids_T = torch.randint(0, 256, (T,), generator=gen)
        rows = slice(rank * T // world, (rank + 1) * T // world)
        cap = max(1, math.ceil(factor * (T // world) * K / ep))
        if transport == "capacity":
            ref.dispatcher = DroppingReference(world, ep, cap)

        x_ref = x_TD.clone().requires_grad_()
        y_ref = ref(x_ref, ids_T)
        ((y_ref * g_TD).sum() / world + ref.aux_loss).backward()

        model = parallel_copy(Holder(layer), ep, world, DispatchOptions(name=transport, capacity_factor=factor))
        x_loc = x_TD[rows].clone().requires_grad_()
        y_loc = model(x_loc, ids_T[rows])
        (((y_loc * g_TD[rows]).sum() + layer.aux_loss) / world).backward()
        dropped = layer.last_stats.get("dispatch_dropped_fraction")
        results[name] = {
            "dispatcher": type(layer.dispatcher).__name__,
            "out": _maxdiff(y_loc.detach(), y_ref.detach()[rows]),
            "x_grad": _maxdiff(x_loc.grad, x_ref.grad[rows]),
            "grads": _param_diffs(model.layer, ref, "grad"),
            "aux": abs(layer.aux_loss.item() - ref.aux_loss.item()),
            "dropped": None if dropped is None else float(dropped),
            "ref_kept": getattr(ref.dispatcher, "kept_fraction", None),
            "host_syncs": layer.dispatcher.host_syncs,
            "rows_received": layer.dispatcher.last_exchange_rows[1]
            if hasattr(layer.dispatcher, "last_exchange_rows")
            else None,
        }
    return results
