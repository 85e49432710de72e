"""A model's weights as safetensors stores them: one entry per tensor, on the CPU."""

from __future__ import annotations

import torch


def _unique_entries(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict entries without aliases (tied embeddings: the same Parameter under two names) or
    non-tensor entries (megatron-core's `_extra_state`)."""
    seen, out = set(), {}
    for name, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor) or id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t
    return out


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What safetensors stores: every tensor once, detached, contiguous, on the CPU."""
    return {name: t.detach().to("cpu").contiguous() for name, t in _unique_entries(model).items()}


def state_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The shapes of `unique_state_dict(model)` without touching the data (works on the meta device)."""
    return {name: tuple(t.shape) for name, t in _unique_entries(model).items()}
