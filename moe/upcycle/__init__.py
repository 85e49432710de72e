"""Sparse upcycling: initialise an MoE from a dense model by copying each MLP into every expert.

Function preservation (Komatsuzaki et al. 2022): with identical experts and a gate whose
weights over the chosen experts sum to 1 (softmax top-k with renormalisation), the MoE
layer computes exactly the dense MLP, whatever the router picks. The router starts
small-normal by default (`router_init="auto"`): exact, and it sends different tokens to the
identical copies, so they diverge. A zero router is exact too but ties every logit: the same
experts win every token by index and identical copies get identical gradients, so they never
diverge (available as `router_init="zero"`, not the default).

Granular upcycling (granularity m): the dense hidden dimension F is split into m slices
of width F/m, and the N copies of the dense MLP become N*m experts (copy-major: expert
c*m + j is slice j of copy c) with top_k*m active, the same active parameter count.
Since the MLP is elementwise over its hidden units, sum_j slice_j(x) == mlp(x). Each
slice's down projection is scaled by m, so the renormalised weights 1/(k*m) of a
uniform selection give each slice total weight 1. Exact when the selected K = k*m
experts hold every slice equally often. That is guaranteed when the router rows are
tied across the m slices of a copy and differ between copies: each copy's m slices then
have identical logits, and top-(k*m) takes k whole copies. This is `router_init="auto"`
(small-normal, tied across slices). A zero router ties *all* experts, and
tie-breaking may then pick an unbalanced set; it is exact only when top_k == num_experts.

`upcycle_model` is the generic path for any `nn.Module` transformer (Hugging Face
Llama/Mistral/Qwen/GPT-2/BERT, ...): MLP modules found by a selector become `MoELayer`s.
`upcycle_transformer` upcycles a dense moeflow `Transformer` into a new one whose config
(and so its checkpoint) describes the MoE, for `moeflow train`.
"""

from __future__ import annotations

from ..layer import moe_aux_loss, moe_layers
from .dense import DenseFFN, build_upcycled_layer, fill_experts, fill_moe_layer, init_router
from .generic import ModuleExperts, ScaledFFN, UpcycledFFN, find_ffns, upcycle_model
from .options import ROUTER_INITS, UpcycleError, UpcycleOptions
from .transformer import dense_ffns, upcycle_transformer, upcycled_config
from .verify import max_logit_diff

__all__ = [
    "ROUTER_INITS",
    "DenseFFN",
    "ModuleExperts",
    "ScaledFFN",
    "UpcycleError",
    "UpcycleOptions",
    "UpcycledFFN",
    "build_upcycled_layer",
    "dense_ffns",
    "fill_experts",
    "fill_moe_layer",
    "find_ffns",
    "init_router",
    "max_logit_diff",
    "moe_aux_loss",
    "moe_layers",
    "upcycle_model",
    "upcycle_transformer",
    "upcycled_config",
]
