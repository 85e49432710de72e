"""The MoE layer: gate -> dispatcher -> experts (+ optional shared expert).

Returns a tensor like any FFN, so it can replace the MLP of any transformer
(upcycling). Auxiliary losses and routing statistics of the last forward are kept on
the module (`aux_loss`, `last_stats`) for the model/trainer to collect: `moe_layers(model)`
finds the layers of any model, `moe_aux_loss(model)` sums their losses.

Inputs are `[batch, seq, dim]` by default; a host that passes `[seq, batch, dim]`
(megatron-core) sets `input_layout="sbd"`, so sequence-level gate statistics (the
sequence balance loss) group the right tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from .dispatch import LocalDispatcher
from .errors import need
from .experts import GroupedExperts
from .gates.base import Gate, SequenceShape
from .stats import routing_stats

INPUT_LAYOUTS = ("bsd", "sbd")


class MoELayer(nn.Module):
    def __init__(
        self,
        gate: Gate,
        experts: GroupedExperts,
        shared_expert: nn.Module | None = None,
        dispatcher=None,
        input_layout: str = "bsd",
    ):
        super().__init__()
        need(
            input_layout in INPUT_LAYOUTS,
            f"input_layout={input_layout!r} is unknown; use one of {', '.join(INPUT_LAYOUTS)}",
        )
        self.gate = gate
        self.experts = experts
        self.shared_expert = shared_expert
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        self.input_layout = input_layout
        self.aux_loss: torch.Tensor | None = None
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        token_ids_T = token_ids.reshape(-1) if token_ids is not None else None
        self.gate.sequence_shape = self._sequence_shape(shape)
        routing = self.gate(x_TD, token_ids_T)
        # the dispatcher adds the shared expert (an all-to-all one runs it while tokens are in flight)
        y_TD = self.dispatcher(x_TD, routing, self.experts, shared_expert=self.shared_expert)
        self.aux_loss = routing.aux_loss()
        self.last_stats = routing_stats(routing)
        self.last_stats.update(getattr(self.dispatcher, "last_stats", {}))  # e.g. a capacity dispatcher's drops
        return y_TD.reshape(shape)

    def _sequence_shape(self, shape: torch.Size) -> SequenceShape | None:
        if len(shape) < 3:
            return None
        if self.input_layout == "sbd":
            return SequenceShape(seq_len=shape[0], seq_major=True)
        return SequenceShape(seq_len=shape[-2])


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoELayer of any model (moeflow's Transformer, an upcycled HF model, megatron-core's GPTModel)."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the MoE layers' auxiliary losses from the last forward (add it to the task loss). A model
    without any is 0 on its own device: a CPU zero moved to the GPU each micro-batch was a synchronising
    copy (the dense twin of `moeflow bench train` waited on the GPU every step)."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    if losses:
        return torch.stack(losses).sum()
    return torch.zeros((), device=next((p.device for p in model.parameters()), None))
