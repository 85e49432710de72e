"""`moeflow bench train` arguments for CPU tests: a tiny model, a few steps (what the CLI parses to)."""

from __future__ import annotations

import argparse

# model overrides of a tiny MoE that trains in seconds on 2 cores
TINY_BENCH = [
    "model.n_layers=1",
    "model.d_model=32",
    "model.n_heads=2",
    "model.d_ff=32",
    "model.num_experts=4",
    "model.vocab_size=64",
]


def bench_train_args(variants: str, out=None, override=(), **changes) -> argparse.Namespace:
    """The parsed arguments of `moeflow bench train --shape tiny --variants VARIANTS`, torch experts, on the CPU."""
    base = dict(shape="tiny", variants=variants, impls="torch", seq_len=16, batch_size=2, steps=2, device="cpu")
    return argparse.Namespace(
        **{**base, **changes, "out": None if out is None else str(out), "override": [*TINY_BENCH, *override]}
    )
