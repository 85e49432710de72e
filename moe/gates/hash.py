"""Hash routing (Roller et al., 2021): a fixed hash of the token id picks the experts.

A baseline that needs no learning: the gate has no parameters, so by design no gradient
reaches any router (there is none); the experts still learn. Token ids come from the
model (`MoELayer` passes the input token ids). Expert j of token id v is
(h(v) + j) mod E with h a multiplicative hash (Knuth) of v mixed with `seed`, so the k
experts of a token are distinct; each gets weight 1/k.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..routing import RouterOutput
from .base import Gate
from .common import check_top_k, need

_KNUTH = 2654435761  # floor(2^32 / golden ratio)


class HashGate(Gate):
    def __init__(self, d_model: int, num_experts: int, top_k: int, seed: int = 0):
        super().__init__(d_model, num_experts, top_k)
        check_top_k(top_k, num_experts)
        need(isinstance(seed, int) and seed >= 0, f"gate.seed must be an integer >= 0, got {seed!r}")
        self.seed = seed

    def hash_experts(self, token_ids_T: torch.Tensor) -> torch.Tensor:
        """(T, K) distinct experts per token id; a pure function of (id, seed)."""
        ids = token_ids_T.long() + self.seed * 0x9E3779B9
        h_T = ((ids * _KNUTH) % (1 << 32)) >> 8  # drop the low bits (they cycle with small periods)
        j_K = torch.arange(self.top_k, device=token_ids_T.device)
        return (h_T.unsqueeze(1) + j_K) % self.num_experts

    def route(self, x_TD, token_ids_T=None) -> RouterOutput:
        if token_ids_T is None:
            raise ConfigError(
                "the hash gate routes by token id; call the MoE layer with token_ids (the Transformer does) or choose another gate"
            )
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        expert_TK = self.hash_experts(token_ids_T.reshape(-1))
        token_A = torch.arange(T, device=x_TD.device).repeat_interleave(K)
        weight_A = torch.full((T * K,), 1.0 / K, dtype=x_TD.dtype, device=x_TD.device)
        return RouterOutput(token_A, expert_TK.reshape(-1), weight_A, T, E, {}, {}, token_sorted=True)
