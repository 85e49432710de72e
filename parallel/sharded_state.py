"""Checkpoint state under expert parallelism: always saved full, resharded on load.

Saving gathers every expert shard (and its optimizer moments) over the EP group, so
the checkpoint is byte-for-byte the layout a single process writes; loading slices the
full tensors to this rank's experts. A run can therefore resume with any EP size
(including none). On a model without sharded experts every function here is a no-op
(the gathers are collectives only when EP is on: call them on every rank).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from moeflow.launch.checkpoint import unique_state_dict

from .expert_parallel import expert_shard


def _ep_group_of(model: torch.nn.Module):
    return getattr(model, "_moeflow_ep_group", None)


def _gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`unique_state_dict(model)` with every expert tensor gathered to all E experts (CPU)."""
    state = unique_state_dict(model)
    group = _ep_group_of(model)
    if group is None:
        return state
    for name, p in model.named_parameters():
        if expert_shard(p) is not None and name in state:
            state[name] = _gather_rows(p.detach(), group).cpu()
    return state


def full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """opt.state_dict() with the moments of expert parameters gathered to all experts."""
    osd = opt.state_dict()
    group = _ep_group_of(model)
    if group is None:
        return osd
    for idx, p in enumerate(_ordered_params(opt)):
        if expert_shard(p) is None or idx not in osd["state"]:
            continue
        osd["state"][idx] = {k: _gather_rows(v, group) if _is_row_state(v, p) else v for k, v in osd["state"][idx].items()}
    return osd


def local_model_state(model: torch.nn.Module, full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Slice a full checkpoint's expert tensors to this rank's experts (others untouched)."""
    state = dict(full_state)
    for name, p in model.named_parameters():
        shard = expert_shard(p)
        if shard is not None and name in state and state[name].shape[0] == shard[0]:
            state[name] = state[name][shard[1]:shard[2]].clone()
    return state


def local_optimizer_state(opt: torch.optim.Optimizer, full_osd: dict) -> dict:
    """Slice a full optimizer state's expert moments to this rank's experts."""
    state = dict(full_osd["state"])
    for idx, p in enumerate(_ordered_params(opt)):
        shard = expert_shard(p)
        if shard is None or idx not in state:
            continue
        state[idx] = {k: v[shard[1]:shard[2]].clone() if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == shard[0] and v.shape[1:] == p.shape[1:] else v for k, v in state[idx].items()}
    return {**full_osd, "state": state}


def _ordered_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters in the integer-id order `state_dict()` uses."""
    return [p for group in opt.param_groups for p in group["params"]]


def _is_row_state(v, p: torch.Tensor) -> bool:
    return torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0
