"""Expert choice (Zhou et al., 2022): each expert takes its top-c tokens; balanced by construction.

Scores are a softmax over experts per token; expert e keeps the c tokens with the
highest score for e, where c = ceil(capacity_factor * N * k / E) over the N tokens of the
whole (token-group) batch, capped at N. A token may get 0..E experts; a token no
expert picked passes through the block's residual (reported as `dropped_fraction`).

The selection is per expert over the *batch*, so a token's experts depend on the other
tokens in the batch (for a causal LM this looks across sequences and at later
positions of the same batch; it is the algorithm's known trade-off). Under a token group
the per-expert cut-off is the global c-th best score, so every expert gets exactly c
tokens of the global batch. Gradients reach the router through the gathered scores.
"""

from __future__ import annotations

from ..routing import RouterOutput
from .base import Gate
from .common import (
    capacity_for,
    check_nonneg,
    check_top_k,
    entropy,
    global_fraction,
    keep_top_per_expert,
    need,
    router_logits,
    router_projection,
    tie_break_key,
    token_offset,
)


class ExpertChoiceGate(Gate):
    def __init__(
        self, d_model: int, num_experts: int, top_k: int, capacity_factor: float = 1.0, init_std: float = 0.02
    ):
        super().__init__(d_model, num_experts, top_k)
        check_top_k(top_k, num_experts)
        need(
            isinstance(capacity_factor, (int, float)) and capacity_factor > 0,
            f"gate.capacity_factor must be > 0 for expert choice (1.0 = k experts per token on average), got {capacity_factor!r}",
        )
        check_nonneg("init_std", init_std)
        self.capacity_factor = capacity_factor
        self.proj = router_projection(d_model, num_experts, init_std)

    def capacity(self, num_global_tokens: int) -> int:
        """Tokens per expert: ceil(capacity_factor * N * k / E), between 1 and N."""
        return min(
            num_global_tokens, capacity_for(self.capacity_factor, num_global_tokens, self.top_k, self.num_experts)
        )

    def route(self, x_TD, token_ids_T=None) -> RouterOutput:
        T, E = x_TD.shape[0], self.num_experts
        scores_TE = router_logits(self.proj, x_TD).softmax(-1)
        first, n_global = token_offset(self, T, x_TD.device)
        keep_TE = keep_top_per_expert(self, tie_break_key(scores_TE, first, n_global), self.capacity(n_global))
        token_A, expert_A = keep_TE.nonzero(as_tuple=True)
        weight_A = scores_TE[token_A, expert_A]
        unrouted = (~keep_TE.any(-1)).sum()
        stats = {
            "router_entropy": entropy(self, scores_TE),
            "dropped_fraction": global_fraction(self, unrouted, T, x_TD.device),
        }
        return RouterOutput(token_A, expert_A, weight_A.to(x_TD.dtype), T, E, {}, stats)
