"""Checkpoint state under expert (and tensor) parallelism: always saved full, resharded on load.

Saving gathers every expert shard (and its optimizer moments) over the EP group, and
every FFN hidden-dim shard over the TP group (`tensor_parallel`), so the checkpoint is
byte-for-byte the layout a single process writes; loading slices the full tensors to
this rank's experts, then to its hidden units. A run can therefore resume with any EP
size (including none). On a model without sharded params every function here is a no-op
(the gathers are collectives only when EP/TP is on: call them on every rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeflow.moe.state import unique_state_dict

from .expert_parallel import expert_shard
from .tensor_parallel import gather_full, local_slice, tp_shard


def _ep_group_of(model: torch.nn.Module):
    return getattr(model, "_moeflow_ep_group", None)


def _tp_group_of(model: torch.nn.Module):
    return getattr(model, "_moeflow_tp_group", None)


def _sharded(p: torch.Tensor) -> bool:
    return expert_shard(p) is not None or tp_shard(p) is not None


def _gather(t: torch.Tensor, p: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """Full tensor from this rank's shard `t` of `p`: hidden units over TP, then expert rows over EP."""
    t = gather_full(t, p, _tp_group_of(model))
    return (
        _gather_rows(t, _ep_group_of(model)) if expert_shard(p) is not None and _ep_group_of(model) is not None else t
    )


def _gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`unique_state_dict(model)` with every expert tensor gathered to all E experts (CPU)."""
    state = unique_state_dict(model)
    for name, p in model.named_parameters():
        if _sharded(p) and name in state:
            state[name] = _gather(p.detach(), p, model).cpu()
    return state


def full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """opt.state_dict() with the moments of expert parameters gathered to all experts."""
    osd = opt.state_dict()
    for idx, p in enumerate(_ordered_params(opt)):
        if not _sharded(p) or idx not in osd["state"]:
            continue
        osd["state"][idx] = {
            k: _gather(v, p, model) if _is_row_state(v, p) else v for k, v in osd["state"][idx].items()
        }
    return osd


def local_model_state(model: torch.nn.Module, full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Slice a full checkpoint's expert tensors to this rank's experts and hidden units (others untouched)."""
    state = dict(full_state)
    for name, p in model.named_parameters():
        if name in state:
            state[name] = local_slice(_expert_rows(state[name], p), p)
    return state


def _expert_rows(t, p: torch.Tensor):
    """This rank's expert rows of a full tensor `t` of an EP-sharded `p` (else `t`)."""
    shard = expert_shard(p)
    if shard is None or not torch.is_tensor(t) or t.dim() == 0 or t.shape[0] != shard[0]:
        return t
    return t[shard[1] : shard[2]].clone()


def local_optimizer_state(opt: torch.optim.Optimizer, full_osd: dict) -> dict:
    """Slice a full optimizer state's expert moments to this rank's experts and hidden units."""
    state = dict(full_osd["state"])
    for idx, p in enumerate(_ordered_params(opt)):
        if not _sharded(p) or idx not in state:
            continue
        state[idx] = {k: _local_moment(v, p) for k, v in state[idx].items()}
    return {**full_osd, "state": state}


def _local_moment(v, p: torch.Tensor):
    """A full moment of `p` (same dims as `p`) sliced to this rank's part; step counters etc. unchanged."""
    if not torch.is_tensor(v) or v.dim() != p.dim():
        return v
    return local_slice(_expert_rows(v, p), p)


def _ordered_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters in the integer-id order `state_dict()` uses."""
    return [p for group in opt.param_groups for p in group["params"]]


def _is_row_state(v, p: torch.Tensor) -> bool:
    return torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0
