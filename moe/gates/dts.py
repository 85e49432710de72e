"""Dense-to-sparse gates (EvoMoE's DTS gate, and the activation variant).

The router weights are a tempered softmax, softmax((logits + gumbel) / tau), and a token
goes to every expert whose weight reaches a threshold. Over `anneal_steps` optimizer
steps (stepped by the trainer through `set_step`):
- tau falls geometrically from `temperature_start` to `temperature_end`,
- the threshold rises linearly from 0 (so step 0 is fully dense: every weight >= 0) to
  `threshold`,
- a cap on experts per token falls linearly from E to `top_k` (the final sparsity).
Why the active set can only shrink on a fixed input: ranking by weight is ranking by
logit at any tau, so the cap's top-c sets are nested; and log softmax_e(l / tau) is
concave in 1/tau with value log(1/E) at 1/tau = 0, so while the threshold stays below
1/E (checked at construction) an expert that falls under it never returns. The
number of active experts per token therefore falls adaptively (faster for confident
tokens) and ends at most at `top_k`. Gumbel noise (training only) adds exploration.

`ActivationDTSGate` is the "activation dense-to-sparse" variant: logits = act(W x)
(a linear layer, then an activation), then the same tempered softmax and schedule.

Gradients reach the router through the gathered softmax weights and the balance loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..routing import RouterOutput, counts_of
from .base import Gate
from .common import (
    check_choice,
    check_nonneg,
    check_top_k,
    entropy,
    need,
    router_logits,
    router_projection,
    switch_balance_loss,
)

ROUTER_ACTIVATIONS = {
    "none": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "softplus": F.softplus,
}


class DTSGate(Gate):
    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        temperature_start: float = 2.0,
        temperature_end: float = 0.3,
        anneal_steps: int = 200,
        threshold: float = 0.05,
        gumbel_noise: bool = False,
        renormalize: bool = False,
        aux_loss_coef: float = 0.01,
        router_activation: str = "none",
        init_std: float = 0.02,
    ):
        super().__init__(d_model, num_experts, top_k)
        check_top_k(top_k, num_experts)
        need(
            isinstance(temperature_start, (int, float))
            and isinstance(temperature_end, (int, float))
            and 0 < temperature_end <= temperature_start,
            f"need 0 < gate.temperature_end <= gate.temperature_start (got {temperature_start!r} -> {temperature_end!r}); the schedule anneals the temperature down",
        )
        need(
            isinstance(anneal_steps, int) and anneal_steps >= 1,
            f"gate.anneal_steps must be a positive integer, got {anneal_steps!r}",
        )
        need(
            isinstance(threshold, (int, float)) and 0 < threshold < 1,
            f"gate.threshold={threshold!r} must be in (0, 1); e.g. gate.threshold=0.05",
        )
        need(
            threshold < 1 / num_experts,
            f"gate.threshold={threshold} must be below 1/num_experts={1 / num_experts:.4g} so that the active set only shrinks as the temperature falls; lower gate.threshold",
        )
        check_choice("router_activation", router_activation, tuple(ROUTER_ACTIVATIONS))
        check_nonneg("aux_loss_coef", aux_loss_coef)
        check_nonneg("init_std", init_std)
        self.temperature_start, self.temperature_end, self.anneal_steps = (
            float(temperature_start),
            float(temperature_end),
            anneal_steps,
        )
        self.final_threshold, self.gumbel_noise, self.renormalize = float(threshold), gumbel_noise, renormalize
        self.aux_loss_coef, self.router_activation = aux_loss_coef, router_activation
        self.proj = router_projection(d_model, num_experts, init_std)

    # -- the schedule (a pure function of the step the trainer set) -----------------------
    def progress(self) -> float:
        return min(1.0, max(0, self.step) / self.anneal_steps)

    def temperature(self) -> float:
        return self.temperature_start * (self.temperature_end / self.temperature_start) ** self.progress()

    def threshold(self) -> float:
        return self.final_threshold * self.progress()

    def max_active(self) -> int:
        E, K = self.num_experts, self.top_k
        return max(K, math.ceil(E - (E - K) * self.progress() - 1e-9))

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return ROUTER_ACTIVATIONS[self.router_activation](router_logits(self.proj, x_TD))

    def route(self, x_TD, token_ids_T=None) -> RouterOutput:
        T, E = x_TD.shape[0], self.num_experts
        logits_TE = self.logits(x_TD)
        if self.training and self.gumbel_noise:
            u_TE = torch.rand_like(logits_TE).clamp_(1e-9, 1 - 1e-9)
            logits_TE = logits_TE - torch.log(-torch.log(u_TE))
        tau = self.temperature()
        probs_TE = (logits_TE / tau).softmax(-1)
        cap = self.max_active()
        # rank by logit (0 = largest): the same order at every temperature, so cap sets are nested
        rank_TE = logits_TE.detach().argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        active_TE = (probs_TE.detach() >= self.threshold()) & (rank_TE < cap)
        token_A, expert_A = active_TE.nonzero(as_tuple=True)
        weights_TE = probs_TE
        if self.renormalize:
            weights_TE = probs_TE * active_TE / (probs_TE * active_TE).sum(-1, keepdim=True).clamp_min(1e-20)
        weight_A = weights_TE[token_A, expert_A]

        losses = {}
        if self.training and self.aux_loss_coef > 0:
            counts_E = counts_of(expert_A, E)
            per_token = self.global_sum(active_TE.sum().float()) / self.global_count(T, x_TD.device)
            losses["load_balance"] = self.aux_loss_coef * switch_balance_loss(
                self, probs_TE, counts_E, per_token.clamp_min(1e-9)
            )
        stats = {
            "router_entropy": entropy(self, probs_TE),
            "temperature": torch.full((), tau, device=x_TD.device),
            "threshold": torch.full((), self.threshold(), device=x_TD.device),
            "max_active_experts": torch.full((), float(cap), device=x_TD.device),
        }
        return RouterOutput(
            token_A, expert_A, weight_A.to(x_TD.dtype), T, E, losses, stats, token_sorted=True
        )  # nonzero() is row-major


class ActivationDTSGate(DTSGate):
    """Activation dense-to-sparse: a linear layer, then an activation (`router_activation`), then the DTS softmax."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        temperature_start: float = 2.0,
        temperature_end: float = 0.3,
        anneal_steps: int = 200,
        threshold: float = 0.05,
        gumbel_noise: bool = False,
        renormalize: bool = False,
        aux_loss_coef: float = 0.01,
        router_activation: str = "gelu",
        init_std: float = 0.02,
    ):
        super().__init__(
            d_model,
            num_experts,
            top_k,
            temperature_start,
            temperature_end,
            anneal_steps,
            threshold,
            gumbel_noise,
            renormalize,
            aux_loss_coef,
            router_activation,
            init_std,
        )
