"""The gate (router) interface shared by every routing algorithm.

A gate maps token activations to a *flat list of assignments* (token, expert, weight):
a `RouterOutput` (`moeflow.moe.routing`, which dispatchers read too).
Flat assignments express every routing family with one shape: top-k (k per token),
capacity dropping (dropped pairs are simply absent), expert choice (a token may get
0..E experts) and dense-to-sparse (a varying number per token).

Shape suffixes: T tokens, D model dim, E experts, K top-k, A assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..routing import RouterOutput


@dataclass(frozen=True)
class SequenceShape:
    """How the layer's flat tokens form sequences of `seq_len` tokens: flattened batch-major
    (token t = b * seq_len + s) or, with `seq_major`, position-major (t = s * num_sequences + b)."""

    seq_len: int
    seq_major: bool = False


class _DifferentiableSum(torch.autograd.Function):
    """Sum over a process group whose every rank's result enters the loss: the gradient of each
    input is the sum of the output gradients (an all-reduce back). torch's own
    `torch.distributed.nn.functional.all_reduce` does this and is deprecated; the functional
    collectives it points to define no such backward."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class Gate(nn.Module):
    """Base class: subclasses implement `route(x_TD, token_ids_T)`.

    `token_group` is the process group over which token statistics (load, aux-loss
    means, Sinkhorn marginals) are reduced. None means the local tokens are the whole
    batch; expert/data parallelism sets it so that a sharded batch routes exactly like
    the single-process global batch.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int):
        super().__init__()
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k
        self.token_group: dist.ProcessGroup | None = None
        self.step = 0
        self.sequence_shape: SequenceShape | None = None  # set by the MoE layer each forward
        # context parallelism (set from outside): the ranks holding the other parts of this rank's sequences
        self.sequence_group: dist.ProcessGroup | None = None

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        return self.route(x_TD, token_ids_T)

    def route(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None) -> RouterOutput:
        raise NotImplementedError

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """State a fresh gate starts from (zeros): after a meta-device model is materialised."""
        for buf in self.buffers(recurse=False):
            buf.zero_()

    def set_step(self, step: int) -> None:
        """Called by the trainer before each optimizer step (schedules, bias updates)."""
        self.step = step

    # -- token statistics over the whole (possibly sharded) batch ----------------------
    def global_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over all ranks of `token_group`, differentiable (identity when local)."""
        if self.token_group is None or not dist.is_initialized():
            return t
        return _DifferentiableSum.apply(t, self.token_group)

    def sequence_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks holding the other parts of the same sequences (context parallelism),
        differentiable; identity when every rank holds whole sequences."""
        if self.sequence_group is None or not dist.is_initialized():
            return t
        return _DifferentiableSum.apply(t, self.sequence_group)

    def sequence_parts(self) -> int:
        return dist.get_world_size(self.sequence_group) if self.sequence_group is not None else 1

    def global_count(self, num_local: int, device: torch.device) -> torch.Tensor:
        n = torch.full((), float(num_local), device=device)  # a fill kernel: no host-to-device copy, no sync
        if self.token_group is None or not dist.is_initialized():
            return n
        dist.all_reduce(n, group=self.token_group)
        return n
