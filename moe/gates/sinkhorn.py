"""Balanced routing by entropic optimal transport: Sinkhorn and Selective Sinkhorn Routing.

`sinkhorn_potentials` scales the kernel exp(logits / (epsilon * sigma)) (T x E; sigma the
logits' global standard deviation, see `transport_kernel`) so that every
token's row carries mass 1 and every expert's column N/E (N = tokens of the whole
token-group batch): P = diag(exp a) K diag(exp b). It iterates in the log domain, in
float32 with autocast off (bf16 cannot resolve the marginals), until the row marginals
are within `tolerance` of 1 (the columns are exact after each column update) or
`iterations` run out. Column sums and the error go through the token group, so every
rank runs the same number of iterations and a sharded batch gets the global transport.

`SinkhornGate` (BASE layers / Megatron's sinkhorn router): in training each token's k
experts are the top-k of the transport map (ranking by logits/eps + b_e), and the gating
weights come from the router's own scores, so gradients reach the router through them.
No aux loss is needed. In eval it routes by plain top-k (`balance_in_eval` to keep OT).

`SelectiveSinkhornGate` (SSR): the transport-based assignment only on a fraction of the
training steps (`step_fraction`, spread evenly by a golden-ratio sequence, the same on
every rank and after resume) and of their tokens (`token_fraction`, a seeded draw over
global positions); the other tokens use plain softmax top-k. On transported tokens the
gating weights are the transport map's row restricted to the chosen experts,
renormalised to sum to 1; gradients reach the router through it (the potentials are
constants). For k > 1 both gates transport k times (`balanced_topk`).
No aux loss.
"""

from __future__ import annotations

import math

import torch

from ..routing import RouterOutput
from .base import Gate
from .common import (
    check_choice,
    check_nonneg,
    check_top_k,
    entropy,
    global_max,
    need,
    router_logits,
    router_projection,
    token_offset,
)


def sinkhorn_potentials(gate: Gate, logk_TE: torch.Tensor, iterations: int, tolerance: float):
    """Log-domain Sinkhorn: returns (a_T, b_E, iterations run, max row-marginal error), all float32.

    Targets: rows 1, columns N/E. P_te = exp(logk_te + a_t + b_e).
    """
    device = logk_TE.device
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        logk = logk_TE.detach().float()
        T, E = logk.shape
        log_col_target = torch.log(gate.global_count(T, device).float() / E)
        b_E = torch.zeros(E, device=device)
        err = torch.full((), math.inf, device=device)
        it = 0
        for it in range(1, iterations + 1):
            a_T = -torch.logsumexp(logk + b_E, dim=1)  # rows -> 1
            z_TE = logk + a_T.unsqueeze(1)
            m_E = global_max(gate, z_TE.amax(0) if T else torch.full((E,), -math.inf, device=device))
            m_E = torch.where(torch.isfinite(m_E), m_E, torch.zeros_like(m_E))
            col_E = m_E + torch.log(gate.global_sum((z_TE - m_E).exp().sum(0)))
            b_E = log_col_target - col_E  # columns -> N/E exactly
            row_T = torch.logsumexp(logk + a_T.unsqueeze(1) + b_E, dim=1).exp()
            err = global_max(gate, (row_T - 1).abs().amax() if T else torch.zeros((), device=device))
            if bool(err <= tolerance):
                break
        return a_T, b_E, it, err


def balanced_topk(gate: Gate, logk_TE: torch.Tensor, k: int, iterations: int, tolerance: float):
    """k rounds of balanced top-1: round j transports over the experts a token has not chosen yet.

    One transport with rows 1 balances only the first choice (the top-2 of a row is not
    balanced); k rounds, each with columns N/E, balance every slot and so the total.
    Returns (expert_TK, log-map value of each choice (logk + b_e of its round), total
    iterations, max row-marginal error).
    """
    logk = logk_TE.detach().float()
    expert_TK = torch.empty(logk.shape[0], k, dtype=torch.long, device=logk.device)
    b_KE = logk.new_zeros(k, logk.shape[1])
    total, worst = 0, torch.zeros((), device=logk.device)
    for j in range(k):
        _, b_E, iters, err = sinkhorn_potentials(gate, logk, iterations, tolerance)
        expert_TK[:, j] = (logk + b_E).argmax(-1)
        b_KE[j] = b_E
        logk = logk.scatter(1, expert_TK[:, j : j + 1], -math.inf)
        total, worst = total + iters, torch.maximum(worst, err)
    return expert_TK, b_KE, total, worst


def transport_kernel(gate: Gate, logits_TE: torch.Tensor, epsilon: float) -> torch.Tensor:
    """log-kernel logits / (epsilon * sigma), sigma = the spread Sinkhorn cannot absorb.

    Sinkhorn is blind to per-token and per-expert offsets (the potentials a_t, b_e absorb
    them), so sigma is the standard deviation of the double-centred logits over the global
    batch. Why relative: a freshly initialised router has logits ~0.02 apart; with an
    absolute epsilon the kernel is flat, Sinkhorn meets its (soft) marginals at once and the
    hard top-k is the argmax of noise, no better balanced than plain top-k. In units of
    this spread the transport is equally sharp at every router scale and skew.
    """
    with torch.no_grad():
        lg = logits_TE.detach().float()
        T, E = lg.shape
        n = gate.global_count(T, lg.device)
        col_E = gate.global_sum(lg.sum(0)) / n
        resid_TE = lg - lg.mean(1, keepdim=True) - col_E + col_E.mean()
        sigma = (gate.global_sum(resid_TE.square().sum()) / (n * E)).sqrt().clamp_min(1e-6)
    return logits_TE / (epsilon * sigma.to(logits_TE.dtype))


def _check_sinkhorn_options(iterations, tolerance, epsilon) -> None:
    need(
        isinstance(iterations, int) and iterations >= 1,
        f"gate.iterations must be a positive integer, got {iterations!r}",
    )
    need(isinstance(tolerance, (int, float)) and tolerance > 0, f"gate.tolerance must be > 0, got {tolerance!r}")
    need(
        isinstance(epsilon, (int, float)) and epsilon > 0,
        f"gate.epsilon (entropic temperature) must be > 0, got {epsilon!r}",
    )


class SinkhornGate(Gate):
    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        iterations: int = 100,
        tolerance: float = 1e-3,
        epsilon: float = 0.2,
        score_func: str = "softmax",
        renormalize: bool = True,
        balance_in_eval: bool = False,
        init_std: float = 0.02,
    ):
        super().__init__(d_model, num_experts, top_k)
        check_top_k(top_k, num_experts)
        _check_sinkhorn_options(iterations, tolerance, epsilon)
        check_choice("score_func", score_func, ("softmax", "sigmoid"))
        check_nonneg("init_std", init_std)
        self.iterations, self.tolerance, self.epsilon = iterations, float(tolerance), float(epsilon)
        self.score_func, self.renormalize, self.balance_in_eval = score_func, renormalize, balance_in_eval
        self.proj = router_projection(d_model, num_experts, init_std)

    def route(self, x_TD, token_ids_T=None) -> RouterOutput:
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        logits_TE = router_logits(self.proj, x_TD)
        scores_TE = logits_TE.softmax(-1) if self.score_func == "softmax" else logits_TE.sigmoid()
        stats = {"router_entropy": entropy(self, logits_TE.softmax(-1))}
        select_TE = logits_TE.detach()
        if self.training or self.balance_in_eval:
            expert_TK, _, iters, err = balanced_topk(
                self, transport_kernel(self, logits_TE, self.epsilon), K, self.iterations, self.tolerance
            )
            stats.update(sinkhorn_iterations=torch.full((), float(iters), device=x_TD.device), sinkhorn_error=err)
        else:
            expert_TK = select_TE.topk(K, dim=-1).indices
        weight_TK = scores_TE.gather(1, expert_TK)
        if self.renormalize:
            weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        token_A = torch.arange(T, device=x_TD.device).repeat_interleave(K)
        return RouterOutput(
            token_A, expert_TK.reshape(-1), weight_TK.reshape(-1).to(x_TD.dtype), T, E, {}, stats, token_sorted=True
        )


class SelectiveSinkhornGate(Gate):
    _GOLDEN = (math.sqrt(5) - 1) / 2

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        step_fraction: float = 0.5,
        token_fraction: float = 1.0,
        iterations: int = 100,
        tolerance: float = 1e-3,
        epsilon: float = 0.2,
        seed: int = 0,
        init_std: float = 0.02,
    ):
        super().__init__(d_model, num_experts, top_k)
        check_top_k(top_k, num_experts)
        _check_sinkhorn_options(iterations, tolerance, epsilon)
        for name, v in (("step_fraction", step_fraction), ("token_fraction", token_fraction)):
            need(
                isinstance(v, (int, float)) and 0 < v <= 1,
                f"gate.{name}={v!r} must be in (0, 1]; 1 applies Sinkhorn everywhere",
            )
        need(isinstance(seed, int), f"gate.seed must be an integer, got {seed!r}")
        check_nonneg("init_std", init_std)
        self.step_fraction, self.token_fraction = float(step_fraction), float(token_fraction)
        self.iterations, self.tolerance, self.epsilon = iterations, float(tolerance), float(epsilon)
        self.seed = seed
        self.proj = router_projection(d_model, num_experts, init_std)

    def transport_step(self) -> bool:
        """Whether the current step uses the transport map: an evenly spread `step_fraction` of steps."""
        return ((self.step + 1) * self._GOLDEN) % 1.0 < self.step_fraction

    def _transported_tokens(self, T: int, device) -> torch.Tensor:
        if self.token_fraction >= 1:
            return torch.ones(T, dtype=torch.bool, device=device)
        first, n_global = token_offset(self, T, device)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        return (torch.rand(n_global, generator=g)[first : first + T] < self.token_fraction).to(device)

    def route(self, x_TD, token_ids_T=None) -> RouterOutput:
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        logits_TE = router_logits(self.proj, x_TD)
        probs_TE = logits_TE.softmax(-1)
        expert_TK = logits_TE.detach().topk(K, dim=-1).indices
        weight_TK = probs_TE.gather(1, expert_TK)
        weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        stats = {"router_entropy": entropy(self, probs_TE), "transported_fraction": torch.zeros((), device=x_TD.device)}
        if self.training and self.transport_step():
            logk_TE = transport_kernel(self, logits_TE, self.epsilon)
            ot_expert_TK, b_KE, iters, err = balanced_topk(self, logk_TE, K, self.iterations, self.tolerance)
            # the transport map's entries of the chosen experts, up to the row's constant (each from its round)
            ot_log_TK = logk_TE.gather(1, ot_expert_TK) + b_KE.gather(1, ot_expert_TK.T).T
            ot_weight_TK = ot_log_TK.softmax(-1)
            use_T = self._transported_tokens(T, x_TD.device)
            expert_TK = torch.where(use_T.unsqueeze(1), ot_expert_TK, expert_TK)
            weight_TK = torch.where(use_T.unsqueeze(1), ot_weight_TK, weight_TK)
            stats.update(
                transported_fraction=use_T.float().mean(),
                sinkhorn_iterations=torch.full((), float(iters), device=x_TD.device),
                sinkhorn_error=err,
            )
        token_A = torch.arange(T, device=x_TD.device).repeat_interleave(K)
        return RouterOutput(
            token_A, expert_TK.reshape(-1), weight_TK.reshape(-1).to(x_TD.dtype), T, E, {}, stats, token_sorted=True
        )
