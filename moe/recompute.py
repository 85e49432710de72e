"""Is this forward a recomputation (activation checkpointing)? Side effects must not run twice.

A checkpointed block runs its forward again during the backward. Most of it is pure, but a
gate that accumulates load for its bias update (DeepSeek-V3's aux-loss-free balancing) would
count the recomputed tokens twice; it asks `recomputing()` first.
"""

from __future__ import annotations

import contextlib
import threading

_state = threading.local()


def recomputing() -> bool:
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def recompute_scope():
    """Entered by the activation-checkpoint wrapper around a recomputation."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
