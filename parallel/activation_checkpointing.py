"""Activation checkpointing of transformer blocks, applied from outside: `trainer.activation_checkpointing`.

- `full`: a checkpointed block keeps only its input; its forward runs again in the backward.
- `selective`: the block keeps the outputs of its matmuls, attention, expert kernels and expert
  exchanges (the expensive ops; an exchange recomputed is an all-to-all sent twice) and
  recomputes the rest (norms, activations, routing arithmetic).
- `every=N`: only every N-th block is checkpointed (the others keep everything).

The block stays the same module (no wrapper: parameter names and checkpoints do not change);
it runs `torch.utils.checkpoint` with the context this module gives it. Recomputation runs
inside `moeflow.moe.recompute.recompute_scope`, so gates skip side effects the first pass did.
Both are numerically equal to no checkpointing (tested): the RNG state is replayed.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from moeflow.moe.errors import ConfigError
from moeflow.moe.recompute import recompute_scope

MODES = ("none", "full", "selective")


def _saved_ops() -> set:
    """The ops whose outputs selective checkpointing keeps."""
    aten = torch.ops.aten
    ops = {
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten.linear.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
    }
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        op = getattr(aten, name, None)
        if op is not None:
            ops.add(op.default)
    moeflow_ops = getattr(torch.ops, "moeflow", None)
    for name in (
        "experts_fwd",
        "all_to_all",
    ):  # the Triton expert kernels and the EP exchange (custom ops), when registered
        if moeflow_ops is not None and hasattr(moeflow_ops, name):
            ops.add(getattr(moeflow_ops, name).default)
    return ops


def _policy(saved, ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _both(*contexts):
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def _full_contexts():
    return contextlib.nullcontext(), recompute_scope()


def _selective_contexts():
    forward, recompute = create_selective_checkpoint_contexts(functools.partial(_policy, _saved_ops()))
    return forward, _both(recompute, recompute_scope())


def apply_activation_checkpointing(model, mode: str, every: int = 1) -> int:
    """Checkpoint every `every`-th block of `model` (blocks in `model.blocks`); how many were."""
    if mode not in MODES:
        raise ConfigError(f"trainer.activation_checkpointing={mode!r} is unknown; choose one of {', '.join(MODES)}")
    if not isinstance(every, int) or every < 1:
        raise ConfigError(f"trainer.activation_checkpointing_every must be a positive integer, got {every!r}")
    context_fn = {"none": None, "full": _full_contexts, "selective": _selective_contexts}[mode]
    count = 0
    for i, block in enumerate(model.blocks):
        on = context_fn is not None and i % every == every - 1
        block.checkpoint_context_fn = context_fn if on else None
        count += on
    return count
