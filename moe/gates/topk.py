"""Top-k token-choice gate (Switch / GShard / Mixtral style) with a load-balancing loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Gate, RouterOutput


class TopKGate(Gate):
    """Softmax over E expert logits, keep the k largest per token.

    Load-balancing loss (Switch Transformer, eq. 4): aux = E * sum_e f_e * P_e, where
    f_e is the fraction of (token, slot) assignments that went to expert e and P_e the
    mean router probability of e over tokens. It is 1 when routing is uniform.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        renormalize: bool = True,
        aux_loss_coef: float = 0.01,
        init_std: float = 0.02,
    ):
        super().__init__(d_model, num_experts, top_k)
        self.renormalize = renormalize
        self.aux_loss_coef = aux_loss_coef
        self.proj = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=init_std) if init_std > 0 else nn.init.zeros_(self.proj.weight)

    def route(self, x_TD, token_ids_T=None) -> RouterOutput:
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        logits_TE = self.proj(x_TD).to(torch.promote_types(x_TD.dtype, torch.float32))  # fp32 at least, fp64 in tests
        probs_TE = logits_TE.softmax(dim=-1)
        weight_TK, expert_TK = probs_TE.topk(K, dim=-1)
        if self.renormalize:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)

        losses = {}
        if self.aux_loss_coef > 0 and self.training:
            losses["load_balance"] = self.aux_loss_coef * self.load_balance_loss(probs_TE, expert_TK)

        token_A = torch.arange(T, device=x_TD.device).repeat_interleave(K)
        return RouterOutput(
            token_A=token_A,
            expert_A=expert_TK.reshape(-1),
            weight_A=weight_TK.reshape(-1).to(x_TD.dtype),
            num_tokens=T,
            num_experts=E,
            losses=losses,
            stats={"router_entropy": -(probs_TE * probs_TE.clamp_min(1e-9).log()).sum(-1).mean().detach()},
        )

    def load_balance_loss(self, probs_TE: torch.Tensor, expert_TK: torch.Tensor) -> torch.Tensor:
        E, K = self.num_experts, expert_TK.shape[1]
        counts_E = F.one_hot(expert_TK.reshape(-1), E).sum(0).float()
        n_tokens = self.global_count(probs_TE.shape[0], probs_TE.device)
        f_E = self.global_sum(counts_E) / (n_tokens * K)
        P_E = self.global_sum(probs_TE.sum(0)) / n_tokens
        return E * (f_E.detach() * P_E).sum()
