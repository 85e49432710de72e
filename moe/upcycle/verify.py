"""Does the upcycled model compute what the dense one did? Both on the same random tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch


@torch.no_grad()
def max_logit_diff(
    dense_fn: Callable[[torch.Tensor], torch.Tensor],
    moe_fn: Callable[[torch.Tensor], torch.Tensor],
    vocab_size: int,
    batch: int = 2,
    seq_len: int = 16,
    seed: int = 0,
) -> dict:
    """Run both models on the same random tokens: the max absolute and relative logit difference."""
    tokens = torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    a, b = dense_fn(tokens).double(), moe_fn(tokens).double()
    diff = (a - b).abs().max().item()
    scale = a.abs().max().item()
    return {
        "max_abs_diff": diff,
        "max_rel_diff": diff / max(scale, 1e-30),
        "max_abs_logit": scale,
        "tokens": list(tokens.shape),
    }
