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
    """Two experts whose router rows are equal, when the router is a plain tensor here (else None).

    Checked at every log point, so cheaply: an exact integer fingerprint of each row's bits (a
    wrapping int64 dot product with fixed random coefficients, order-independent, so equal rows give
    equal fingerprints), one small host read, and an exact comparison only of rows whose
    fingerprints match (`torch.unique(dim=0)` sorted the whole matrix on the GPU at every log point)."""
    n = layer.experts.num_experts
    for _, p in layer.gate.named_parameters():
        if p.dim() != 2 or p.shape[0] != n:
            continue
        if hasattr(p, "device_mesh"):  # a DTensor: its rows live on other ranks
            return None
        rows = p.detach()
        prints = (_row_bits(rows) * _coefficients(rows.shape[1], rows.device)).sum(dim=1).tolist()
        first: dict[int, int] = {}
        for j, h in enumerate(prints):
            i = first.setdefault(h, j)
            if i != j and torch.equal(rows[i], rows[j]):
                return i, j
    return None


def _row_bits(rows: torch.Tensor) -> torch.Tensor:
    """Each element's bit pattern as an int64 (equal bits: equal values, -0.0 aside)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[rows.element_size()]
    return rows.contiguous().view(ints).long()


_COEFFICIENTS: dict[tuple[int, str], torch.Tensor] = {}


def _coefficients(width: int, device: torch.device) -> torch.Tensor:
    key = (width, str(device))
    if key not in _COEFFICIENTS:
        g = torch.Generator().manual_seed(0x5EED)
        _COEFFICIENTS[key] = torch.randint(-(2**62), 2**62, (width,), generator=g, dtype=torch.int64).to(device)
    return _COEFFICIENTS[key]
