"""Top-k token choice (Switch / GShard / Mixtral / DeepSeek-V3 style): each token picks k experts.

One gate covers the family through options (all checked at construction):
- scores: `score_func` softmax or sigmoid; `topk_before_softmax` (Mixtral: pick on the
  logits, softmax over the k chosen) or after; `renormalize` the k weights to sum to 1.
- balance: Switch load-balancing loss (`aux_loss_coef`), sequence-level balance loss
  (`seq_aux_loss_coef`, DeepSeek-V3 eq. 17-20), router z-loss (`z_loss_coef`, ST-MoE),
  aux-loss-free balancing (`bias_update_rate`, DeepSeek-V3): a per-expert bias added to
  the scores for *selection only*, nudged by +-rate each optimizer step toward equal load.
- capacity: `dropless=true` (default) or `capacity_factor` slots per expert
  (ceil(factor * T * k / E)); overflow assignments are dropped by `drop_policy`
  (`score`: lowest scores dropped; `position`: GShard order, first choices before second
  choices, earlier tokens first). A token whose every choice is dropped gets a zero
  MoE output, i.e. it passes through the block's residual unchanged.
- exploration: `jitter_eps` (Switch multiplicative input jitter) and `noise_std`
  (Gaussian noise on the logits), training only.
- group-limited routing (`n_groups`, `topk_groups`, DeepSeek-V2/V3): rank expert groups
  by the sum of their best two scores, keep `topk_groups` groups, then pick k experts there.

Gradients reach the router through the k gathered weights (and the aux losses).
Load statistics are global over `token_group`; the choice of each token's experts is local.
"""

from __future__ import annotations

import math

import torch

from ..recompute import recomputing
from ..routing import RouterOutput, counts_of
from .base import Gate, SequenceShape
from .common import (
    capacity_for,
    check_capacity,
    check_choice,
    check_nonneg,
    check_top_k,
    entropy,
    global_fraction,
    keep_top_per_expert,
    need,
    router_logits,
    router_projection,
    switch_balance_loss,
    tie_break_key,
    token_offset,
    top_k_indices,
    z_loss,
)


class TopKGate(Gate):
    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        score_func: str = "softmax",
        topk_before_softmax: bool = False,
        renormalize: bool = True,
        aux_loss_coef: float = 0.01,
        seq_aux_loss_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        dropless: bool = True,
        capacity_factor: float | None = None,
        drop_policy: str = "score",
        jitter_eps: float = 0.0,
        noise_std: float = 0.0,
        bias_update_rate: float = 0.0,
        n_groups: int | None = None,
        topk_groups: int | None = None,
        init_std: float = 0.02,
    ):
        super().__init__(d_model, num_experts, top_k)
        check_top_k(top_k, num_experts)
        check_choice("score_func", score_func, ("softmax", "sigmoid"))
        need(
            not (topk_before_softmax and score_func != "softmax"),
            "gate.topk_before_softmax=true only applies to gate.score_func=softmax; drop it or use softmax",
        )
        for name, value in (
            ("aux_loss_coef", aux_loss_coef),
            ("seq_aux_loss_coef", seq_aux_loss_coef),
            ("z_loss_coef", z_loss_coef),
            ("noise_std", noise_std),
            ("bias_update_rate", bias_update_rate),
            ("init_std", init_std),
        ):
            check_nonneg(name, value)
        need(
            isinstance(jitter_eps, (int, float)) and 0 <= jitter_eps < 1,
            f"gate.jitter_eps must be in [0, 1), got {jitter_eps!r}",
        )
        check_capacity(capacity_factor, dropless, drop_policy)
        if n_groups is not None or topk_groups is not None:
            need(
                n_groups is not None and topk_groups is not None,
                "group-limited routing needs both gate.n_groups and gate.topk_groups (or neither)",
            )
            need(
                isinstance(n_groups, int) and n_groups >= 1 and num_experts % n_groups == 0,
                f"gate.n_groups={n_groups!r} must divide num_experts={num_experts}",
            )
            need(
                isinstance(topk_groups, int) and 1 <= topk_groups <= n_groups,
                f"gate.topk_groups={topk_groups!r} must be in [1, gate.n_groups={n_groups}]",
            )
            need(
                top_k <= topk_groups * (num_experts // n_groups),
                f"top_k={top_k} exceeds the experts in gate.topk_groups={topk_groups} groups ({topk_groups * (num_experts // n_groups)}); raise topk_groups",
            )
        self.score_func, self.topk_before_softmax, self.renormalize = score_func, topk_before_softmax, renormalize
        self.aux_loss_coef, self.seq_aux_loss_coef, self.z_loss_coef = aux_loss_coef, seq_aux_loss_coef, z_loss_coef
        self.dropless, self.capacity_factor, self.drop_policy = dropless, capacity_factor, drop_policy
        self.jitter_eps, self.noise_std = jitter_eps, noise_std
        self.bias_update_rate = bias_update_rate
        self.n_groups, self.topk_groups = n_groups, topk_groups
        self.proj = router_projection(d_model, num_experts, init_std)
        if bias_update_rate > 0:  # buffers: checkpoints carry them, so resume continues the same balancing
            self.register_buffer("expert_bias_E", torch.zeros(num_experts))
            self.register_buffer("load_accum_E", torch.zeros(num_experts))

    # -- the schedule hook: apply the load observed since the last optimizer step ---------
    @torch.no_grad()
    def set_step(self, step: int) -> None:
        super().set_step(step)
        if self.bias_update_rate > 0:  # no host read of the load: with none counted every sign below is 0
            load_E = self.load_accum_E
            self.expert_bias_E += self.bias_update_rate * torch.sign(load_E.mean() - load_E)
            self.load_accum_E.zero_()

    def route(self, x_TD, token_ids_T=None) -> RouterOutput:
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        if self.training and self.jitter_eps > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
        logits_TE = router_logits(self.proj, x_TD)
        if self.training and self.noise_std > 0:
            logits_TE = logits_TE + self.noise_std * torch.randn_like(logits_TE)
        scores_TE = logits_TE.softmax(-1) if self.score_func == "softmax" else logits_TE.sigmoid()

        select_TE = (logits_TE if self.topk_before_softmax else scores_TE).detach()
        if self.bias_update_rate > 0:
            select_TE = select_TE + self.expert_bias_E
        if self.n_groups is not None:
            select_TE = self._limit_to_groups(select_TE)
        expert_TK = top_k_indices(select_TE, K)
        if self.topk_before_softmax:
            weight_TK = logits_TE.gather(1, expert_TK).softmax(-1)
        else:
            weight_TK = scores_TE.gather(1, expert_TK)
            if self.renormalize:
                weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).clamp_min(1e-20)

        probs_TE = (
            scores_TE if self.score_func == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        )
        counts_E = counts_of(expert_TK.reshape(-1), E)
        losses = self._losses(logits_TE, probs_TE, expert_TK, counts_E) if self.training else {}
        if self.training and self.bias_update_rate > 0 and not recomputing():  # count each step's tokens once
            with torch.no_grad():
                self.load_accum_E += self.global_sum(counts_E.float())

        token_A = torch.arange(T, device=x_TD.device).repeat_interleave(K)
        expert_A, weight_A = expert_TK.reshape(-1), weight_TK.reshape(-1)
        stats = {"router_entropy": entropy(self, probs_TE)}
        if not self.dropless:
            keep_A = self._keep_within_capacity(scores_TE.detach(), expert_TK)
            stats["dropped_fraction"] = global_fraction(self, (~keep_A).sum(), keep_A.numel(), x_TD.device)
            token_A, expert_A, weight_A = token_A[keep_A], expert_A[keep_A], weight_A[keep_A]
        if self.bias_update_rate > 0:
            stats["expert_bias_absmax"] = self.expert_bias_E.abs().max().detach()
        return RouterOutput(token_A, expert_A, weight_A.to(x_TD.dtype), T, E, losses, stats, token_sorted=True)

    def _limit_to_groups(self, select_TE: torch.Tensor) -> torch.Tensor:
        T, E = select_TE.shape
        per_group = E // self.n_groups
        grouped_TGe = select_TE.view(T, self.n_groups, per_group)
        group_score_TG = grouped_TGe.topk(min(2, per_group), dim=-1).values.sum(-1)
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(
            1, group_score_TG.topk(self.topk_groups, dim=-1).indices, True
        )
        return select_TE.masked_fill(~keep_TG.repeat_interleave(per_group, dim=1), -math.inf)

    def _losses(self, logits_TE, probs_TE, expert_TK, counts_E) -> dict[str, torch.Tensor]:
        losses = {}
        K = expert_TK.shape[1]
        if self.aux_loss_coef > 0:
            losses["load_balance"] = self.aux_loss_coef * switch_balance_loss(self, probs_TE, counts_E, K)
        if self.seq_aux_loss_coef > 0:
            losses["seq_load_balance"] = self.seq_aux_loss_coef * self.sequence_balance_loss(probs_TE, expert_TK)
        if self.z_loss_coef > 0:
            losses["z_loss"] = self.z_loss_coef * z_loss(self, logits_TE)
        return losses

    def load_balance_loss(self, probs_TE: torch.Tensor, expert_TK: torch.Tensor) -> torch.Tensor:
        """Switch loss (unweighted) for given probabilities and choices; 1 when routing is uniform."""
        return switch_balance_loss(
            self, probs_TE, counts_of(expert_TK.reshape(-1), self.num_experts), expert_TK.shape[1]
        )

    def sequence_balance_loss(self, probs_TE: torch.Tensor, expert_TK: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 sequence-wise balance loss: the Switch loss per sequence, averaged over sequences.

        Sequences come from `self.sequence_shape` (set by the MoE layer from its input's
        layout, [batch, seq] or [seq, batch]); without it the local batch counts as one sequence.
        """
        T, E = probs_TE.shape
        K = expert_TK.shape[1]
        shape = self.sequence_shape
        if shape is None or T % shape.seq_len:
            shape = SequenceShape(seq_len=T)
        S = shape.seq_len
        B = T // S
        onehot_TE = torch.zeros(T, E, device=probs_TE.device).scatter_(1, expert_TK, 1.0)
        probs_TE = probs_TE.float()
        if shape.seq_major:  # token t = s * B + b: sequences are the columns of an (S, B) grid
            onehot_BSE, probs_BSE = (t.view(S, B, E).transpose(0, 1) for t in (onehot_TE, probs_TE))
        else:
            onehot_BSE, probs_BSE = onehot_TE.view(B, S, E), probs_TE.view(B, S, E)
        # under context parallelism a rank holds part of each sequence: its sums join the other parts'
        S_whole = S * self.sequence_parts()
        f_BE = self.sequence_sum(onehot_BSE.sum(1)) * E / (K * S_whole)
        P_BE = self.sequence_sum(probs_BSE.sum(1)) / S_whole
        per_seq_B = (f_BE * P_BE).sum(-1)
        return self.global_sum(per_seq_B.sum()) / self.global_count(B, probs_TE.device)

    def _keep_within_capacity(self, scores_TE: torch.Tensor, expert_TK: torch.Tensor) -> torch.Tensor:
        """Per-assignment keep mask (flattened like expert_TK) under the global capacity."""
        T, K = expert_TK.shape
        first, n_global = token_offset(self, T, expert_TK.device)
        capacity = capacity_for(self.capacity_factor, n_global, K, self.num_experts)
        if self.drop_policy == "score":
            key_TK = tie_break_key(scores_TE, first, n_global).gather(1, expert_TK)
        else:  # GShard: all first choices before any second choice, then earlier tokens first
            pos_T = torch.arange(T, device=expert_TK.device, dtype=torch.float64) + first
            slot_K = torch.arange(K, device=expert_TK.device, dtype=torch.float64)
            key_TK = -(slot_K.unsqueeze(0) * n_global + pos_T.unsqueeze(1))
        key_TE = torch.full(scores_TE.shape, -math.inf, dtype=torch.float64, device=scores_TE.device).scatter_(
            1, expert_TK, key_TK
        )
        keep_TE = keep_top_per_expert(self, key_TE, capacity)
        return keep_TE.gather(1, expert_TK).reshape(-1)
