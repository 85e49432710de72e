"""Tensor parallelism of an MoE layer's FFN hidden dim F (Megatron's column/row-parallel MLP).

Each of `tp` ranks keeps F/tp hidden units of every routed expert and of the shared expert:
the matching columns of w1/w3 (and rows of b1/b3) and rows of w2. Its experts then compute a
partial output that sums to the full one over the TP group; the collectives that make this
exact (identity forward / all-reduce backward on the input, all-reduce forward on the output)
are attached by the caller (`megatron_core.shard_over_tensor_group`, with megatron-core's own
mappings). The gate is not sharded: every TP rank routes the same tokens the same way.

The caller records which dim each returned param was split on (megatron-core: its own
`tensor_model_parallel` attributes, which `megatron_core.megatron_plan` reads into the plan).
"""

from __future__ import annotations

import torch

from moeflow.moe.errors import ConfigError

# param name -> the dim that holds F (routed experts: leading E; shared expert: nn.Linear [out, in])
EXPERT_F_DIMS = {"w1_EDF": 2, "w3_EDF": 2, "b1_EF": 1, "b3_EF": 1, "w2_EFD": 1}
SHARED_F_DIMS = {"w1.weight": 0, "w3.weight": 0, "w2.weight": 1}


def shard_hidden_dim(layer, tp_rank: int, tp: int) -> list[tuple[torch.nn.Parameter, int]]:
    """Keep this TP rank's F/tp hidden units of `layer`'s experts and shared expert (in place;
    the Parameter objects stay the same). Returns (param, the dim it was split on) pairs."""
    experts, shared = layer.experts, layer.shared_expert
    for what, F in (
        ("model.d_ff", experts.d_ff),
        ("the shared expert's hidden size", shared.w1.out_features if shared else 0),
    ):
        if F % tp:
            raise ConfigError(
                f"tensor_model_parallel_size={tp} does not divide {what}={F}; pick a tensor-parallel size that divides it"
            )
    if getattr(experts, "b2_ED", None) is not None:
        raise ConfigError(
            "experts with an output bias (b2_ED) cannot be tensor-parallel (the bias would be summed tp times); use tensor_model_parallel_size=1"
        )
    sharded = []
    for module, dims in ((experts, EXPERT_F_DIMS), (shared, SHARED_F_DIMS)):
        for name, dim in dims.items():
            p = _param_or_none(module, name)
            if p is None:
                continue
            full = p.shape[dim]
            lo, hi = tp_rank * full // tp, (tp_rank + 1) * full // tp
            p.data = p.data.narrow(dim, lo, hi - lo).clone()
            sharded.append((p, dim))
    experts.d_ff //= tp
    experts.permute_fusion = False  # fused kernels weight rows by the gate before the TP reduce: keep them unfused
    return sharded


def _param_or_none(module, name: str):
    if module is None:
        return None
    try:
        return module.get_parameter(name)
    except AttributeError:  # e.g. w3 of a GELU expert
        return None
