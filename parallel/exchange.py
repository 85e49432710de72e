"""Rows between the ranks of an expert-parallel group: `all_to_all_single` as one custom op.

`exchange(x_AD, out_splits, in_splits, group)` sends `in_splits[r]` rows to rank r and receives
`out_splits[r]` from it; its backward is the same exchange with the splits swapped (no host
work: the splits are plain ints known since the forward). It is a torch custom op
(`moeflow::all_to_all`): selective activation checkpointing keeps its output instead of running
the exchange again during the backward, and torch.compile traces it as one node.

`exchange_async` (for the chunked overlap of `AllToAllDispatcher`) launches the same exchange
without waiting; the caller waits on the returned work before reading the output.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _group(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


@torch.library.custom_op("moeflow::all_to_all", mutates_args=())
def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group_name: str) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=_group(group_name))
    return out


@_all_to_all.register_fake
def _(x, out_splits, in_splits, group_name):
    return x.new_empty((sum(out_splits), *x.shape[1:]))


def _setup(ctx, inputs, output):
    _, out_splits, in_splits, group_name = inputs
    ctx.splits, ctx.group_name = (list(out_splits), list(in_splits)), group_name


def _backward(ctx, grad):
    out_splits, in_splits = ctx.splits
    return torch.ops.moeflow.all_to_all(grad.contiguous(), in_splits, out_splits, ctx.group_name), None, None, None


torch.library.register_autograd("moeflow::all_to_all", _backward, setup_context=_setup)


def exchange(x_AD: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows out of this rank (`in_splits[r]` to rank r) and into it (`out_splits[r]` from rank r)."""
    return torch.ops.moeflow.all_to_all(x_AD, list(out_splits), list(in_splits), group.group_name)


class _AsyncExchange(torch.autograd.Function):
    """The same exchange launched without waiting (the forward of a chunked, overlapped dispatch)."""

    @staticmethod
    def forward(ctx, x_AD, out_splits, in_splits, group, pending):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out_AD = x_AD.new_empty(sum(out_splits), *x_AD.shape[1:])
        pending.append(
            dist.all_to_all_single(out_AD, x_AD.contiguous(), out_splits, in_splits, group=group, async_op=True)
        )
        return out_AD

    @staticmethod
    def backward(ctx, g_AD):
        out_splits, in_splits = ctx.splits
        return exchange(g_AD, in_splits, out_splits, ctx.group), None, None, None, None


def exchange_async(x_AD, out_splits: list[int], in_splits: list[int], group, pending: list) -> torch.Tensor:
    return _AsyncExchange.apply(x_AD, out_splits, in_splits, group, pending)
