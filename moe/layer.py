"""The MoE layer: gate -> dispatcher -> experts (+ optional shared experts).

Returns a tensor like any FFN, so it can replace the MLP of any transformer
(upcycling). Auxiliary losses and routing statistics of the last forward are kept on
the module (`aux_loss`, `last_stats`) for the model/trainer to collect.
"""
from __future__ import annotations

import torch
from torch import nn

from .dispatch import LocalDispatcher
from .experts import GroupedExperts
from .gates.base import Gate
from .stats import routing_stats


class MoELayer(nn.Module):
    def __init__(self, gate: Gate, experts: GroupedExperts, shared_expert: nn.Module | None = None, dispatcher=None):
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.shared_expert = shared_expert
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        self.aux_loss: torch.Tensor | None = None
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        token_ids_T = token_ids.reshape(-1) if token_ids is not None else None
        self.gate.seq_len = shape[-2] if len(shape) >= 3 else None  # sequence-level statistics (e.g. seq balance loss)
        routing = self.gate(x_TD, token_ids_T)
        y_TD = self.dispatcher(x_TD, routing, self.experts)
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)
        self.aux_loss = routing.aux_loss()
        self.last_stats = routing_stats(routing)
        return y_TD.reshape(shape)
