"""Which parameters are expert parameters, and optimizer groups that keep them apart.

Expert parameters are sharded over the expert-parallel (EP) group and replicated over the
expert-data-parallel group, so their gradients reduce (and ZeRO shards their optimizer
state) over a different group than the rest of the model. Every engine (torch, DeepSpeed,
megatron-core) asks the same predicate and builds the same groups:

- a parameter is an expert parameter when it carries `moe_expert = True` (set by
  `mark_expert_params`, or by the expert-parallel wrapper when it shards experts), or,
  failing that, when its name has an `experts.` component (routed experts; shared experts
  are dense and live under `shared_expert.`);
- `param_groups(model, weight_decay)` splits {expert, non-expert} x {decay, no decay};
  expert groups carry `moe_expert: True` and `ep_group_name` (the EP size they were
  sharded with), which `moeflow.launch.engines.deepspeed_engine` turns into
  DeepSpeed-MoE groups (`moe: True`, `name`) when EP > 1.
"""

from __future__ import annotations

import re

from torch import nn

from moeflow.moe.errors import ConfigError

_EXPERT_NAME = re.compile(r"(^|\.)experts\.")


def is_expert_param(name: str, param: nn.Parameter) -> bool:
    marked = getattr(param, "moe_expert", None)
    if marked is not None:
        return bool(marked)
    return bool(_EXPERT_NAME.search(name))


def mark_expert_params(model: nn.Module, ep_size: int = 1) -> list[str]:
    """Tag routed-expert params with `moe_expert=True` and `ep_size`; return their names."""
    names = []
    for name, p in model.named_parameters():
        if is_expert_param(name, p):
            p.moe_expert = True
            p.ep_size = getattr(p, "ep_size", ep_size)
            names.append(name)
    return names


def ep_group_name(ep_size: int) -> str:
    """DeepSpeed-MoE's name for the expert-data-parallel group of an EP size."""
    return f"ep_size_{ep_size}"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: (non-expert | expert) x (decay: matrices | no decay: vectors), empty ones dropped.

    Per-parameter math is the same as the plain trainer's two groups; only the grouping
    differs, so engines that shard optimizer state per group can treat experts apart.
    """
    buckets: dict[tuple[bool, bool], list] = {}
    ep_sizes = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        expert = is_expert_param(name, p)
        if expert:
            ep_sizes.add(getattr(p, "ep_size", 1))
        buckets.setdefault((expert, p.dim() >= 2), []).append(p)
    if len(ep_sizes) > 1:
        raise ConfigError(
            f"expert parameters carry different ep_size values {sorted(ep_sizes)}; shard all experts with one EP size"
        )
    ep = ep_sizes.pop() if ep_sizes else 1
    groups = []
    for (expert, decay), params in sorted(buckets.items()):
        g = {
            "params": params,
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"{'experts' if expert else 'dense'}_{'decay' if decay else 'no_decay'}",
        }
        if expert:
            g.update(moe_expert=True, ep_group_name=ep_group_name(ep))
        groups.append(g)
    return groups
