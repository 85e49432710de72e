"""Routing collapse, said while it happens: experts that get no tokens, and routers that cannot tell
experts apart (identical router rows: identical logits, so identical experts then train alike).

Checked at log points from what the loop already has (each layer's global token counts) and,
where the router is a plain tensor on this process, its rows; each problem is warned once.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("moeflow.train")

IDLE_INTERVALS = 5  # log intervals an expert may go without a token before it is called dead


class CollapseWatch:
    def __init__(self, idle_intervals: int = IDLE_INTERVALS):
        self.idle_intervals = idle_intervals
        self.idle: dict[int, torch.Tensor] = {}
        self.warned: set[tuple[str, int]] = set()

    def check(self, model, step: int) -> list[str]:
        """At a log point (after the routing statistics were summed over ranks): the new warnings."""
        said = []
        for i, layer in enumerate(model.moe_layers()):
            counts = (layer.last_stats or {}).get("tokens_per_expert")
            if counts is not None:
                idle = self.idle.get(i, torch.zeros_like(counts, dtype=torch.long, device="cpu"))
                idle = torch.where(counts.detach().cpu() == 0, idle + 1, torch.zeros_like(idle))
                self.idle[i] = idle
                dead = (idle >= self.idle_intervals).nonzero().flatten().tolist()
                if dead and ("dead", i) not in self.warned:
                    self.warned.add(("dead", i))
                    said.append(
                        f"step {step}: layer {i}: experts {dead[:8]} got no tokens for {self.idle_intervals} log intervals "
                        f"(routing collapse); raise gate.aux_loss_coef or check the gate"
                    )
            tied = tied_router_rows(layer)
            if tied and ("tied", i) not in self.warned:
                self.warned.add(("tied", i))
                said.append(
                    f"step {step}: layer {i}: experts {tied[0]} and {tied[1]} have identical router rows, so they are always routed "
                    f"alike (identical copies then never diverge); upcycle with a random router (the default) or add noise"
                )
        for line in said:
            log.warning("%s", line)
        return said


def tied_router_rows(layer) -> tuple[int, int] | None:
    """Two experts whose router rows are equal, when the router is a plain tensor here (else None)."""
    n = layer.experts.num_experts
    for _, p in layer.gate.named_parameters():
        if p.dim() != 2 or p.shape[0] != n:
            continue
        if hasattr(p, "device_mesh"):  # a DTensor: its rows live on other ranks
            return None
        rows = p.detach()
        _, inverse, counts = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
        if (counts > 1).any():
            group = int((counts > 1).nonzero()[0])
            members = (inverse == group).nonzero().flatten().tolist()
            return members[0], members[1]
    return None
