"""Pieces shared by several gates: option checks, capacity selection, balance losses, stats.

Everything that looks across tokens goes through the gate's `token_group`, so a batch
sharded over data/expert-parallel ranks routes exactly like the same global batch on
one process: sums through `Gate.global_sum`/`global_count`, and per-expert "keep the
best c tokens" decisions through a gathered per-expert threshold (`keep_top_per_expert`).

Shape suffixes: T tokens, E experts, K top-k, A assignments, C capacity.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..errors import need
from ..routing import stable_order  # noqa: F401  (re-exported: tests import it from here)
from .base import Gate


def router_projection(d_model: int, num_experts: int, init_std: float) -> nn.Linear:
    """The router's linear map D -> E: normal(0, init_std), or zeros (uniform routing) for init_std 0."""
    proj = nn.Linear(d_model, num_experts, bias=False)
    nn.init.normal_(proj.weight, std=init_std) if init_std > 0 else nn.init.zeros_(proj.weight)
    proj.init_std = init_std  # how moeflow.moe.init re-initialises it (meta-device models)
    return proj


def router_logits(proj, x_TD: torch.Tensor) -> torch.Tensor:
    """Router logits in float32 at least (bf16 softmax/top-k is too coarse), float64 when x is."""
    return proj(x_TD).to(torch.promote_types(x_TD.dtype, torch.float32))


# -- config-time checks (no data: gates are built on the meta device) ----------------


def check_top_k(top_k: int, num_experts: int) -> None:
    need(isinstance(top_k, int) and top_k >= 1, f"top_k must be a positive integer, got {top_k!r}")
    need(
        top_k <= num_experts,
        f"top_k={top_k} is larger than num_experts={num_experts}; set model.top_k <= model.num_experts",
    )


def check_nonneg(name: str, value) -> None:
    need(
        isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
        f"gate.{name} must be a number >= 0, got {value!r}",
    )


def check_choice(name: str, value, choices) -> None:
    need(value in choices, f"gate.{name}={value!r} is unknown; choose one of: {', '.join(map(str, choices))}")


def check_capacity(capacity_factor, dropless: bool, drop_policy: str | None = None) -> None:
    """`dropless` and `capacity_factor` are two answers to one question: exactly one must be given."""
    if dropless:
        need(
            capacity_factor is None,
            f"gate.capacity_factor={capacity_factor} conflicts with gate.dropless=true (dropless never drops); set gate.capacity_factor=null or gate.dropless=false",
        )
    else:
        need(
            capacity_factor is not None,
            "gate.dropless=false needs a capacity: set gate.capacity_factor (e.g. 1.25) or gate.dropless=true",
        )
        need(
            isinstance(capacity_factor, (int, float)) and capacity_factor > 0,
            f"gate.capacity_factor must be > 0, got {capacity_factor!r}",
        )
    if drop_policy is not None:
        check_choice("drop_policy", drop_policy, ("score", "position"))


def capacity_for(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """GShard/Switch capacity: slots per expert = ceil(factor * T * k / E), at least 1."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


# -- group collectives (identity when the gate is local) ------------------------------


def _grouped(gate: Gate) -> bool:
    return gate.token_group is not None and dist.is_initialized()


def all_gather_rows(gate: Gate, t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` (same shape on every rank) along dim 0 over the token group, rank order."""
    if not _grouped(gate):
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(gate.token_group))]
    dist.all_gather(parts, t.contiguous(), group=gate.token_group)
    return torch.cat(parts, 0)


def token_offset(gate: Gate, num_local: int, device: torch.device) -> tuple[int, int]:
    """(global position of this rank's first token, global token count): ranks hold consecutive slices."""
    n = torch.full((1,), num_local, device=device, dtype=torch.int64)
    all_n = all_gather_rows(gate, n)
    if not _grouped(gate):
        return 0, num_local
    rank = dist.get_rank(gate.token_group)
    return int(all_n[:rank].sum()), int(all_n.sum())


def global_max(gate: Gate, t: torch.Tensor) -> torch.Tensor:
    if not _grouped(gate):
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=gate.token_group)
    return t


def tie_break_key(score_TE: torch.Tensor, first_position: int, num_global: int) -> torch.Tensor:
    """float64 keys ordering by score, ties (identical hidden states do happen) by earlier position.

    key = s + (|s| + 1e-40) * d with 0 < d < 2^-26 falling with the global position:
    distinct float32 scores differ by at least 2^-24 relative, so their order is kept, and
    equal scores are separated, so every key is unique (the same on every rank). (float64
    scores closer than 2^-26 relative may swap: harmless, they are equal for routing purposes.)
    """
    pos_T = torch.arange(score_TE.shape[0], device=score_TE.device, dtype=torch.float64) + first_position
    d_T = (2.0**-27) * (1.0 - pos_T / (max(num_global, 1) + 1))
    s = score_TE.detach().double()
    return s + (s.abs() + 1e-40) * d_T.unsqueeze(1)


def keep_top_per_expert(gate: Gate, key_TE: torch.Tensor, capacity: int) -> torch.Tensor:
    """Mask of candidates (key > -inf) that are among their expert's `capacity` largest keys.

    Keys must be unique (see `tie_break_key`). Over a token group each rank contributes its
    local top-`capacity` keys per expert; the global capacity-th largest is the threshold,
    so the kept set equals the single-process one.
    """
    T, E = key_TE.shape
    local_C = min(capacity, T)
    top_CE = key_TE.topk(local_C, dim=0).values if local_C > 0 else key_TE.new_empty(0, E)
    if local_C < capacity:  # equal shapes on every rank for the gather
        top_CE = torch.cat([top_CE, key_TE.new_full((capacity - local_C, E), -math.inf)])
    all_CE = all_gather_rows(gate, top_CE)
    threshold_E = all_CE.topk(capacity, dim=0).values[-1]
    return (key_TE >= threshold_E) & (key_TE > -math.inf)


# -- losses and statistics ---------------------------------------------------------------


def switch_balance_loss(
    gate: Gate, probs_TE: torch.Tensor, counts_E: torch.Tensor, num_assignments_per_token: float
) -> torch.Tensor:
    """Switch Transformer (eq. 4): E * sum_e f_e * P_e over the global batch; 1 when uniform.

    f_e: fraction of assignments routed to e (no gradient); P_e: mean router probability of e.
    """
    E = probs_TE.shape[1]
    n_tokens = gate.global_count(probs_TE.shape[0], probs_TE.device)
    f_E = gate.global_sum(counts_E.float()) / (n_tokens * num_assignments_per_token)
    P_E = gate.global_sum(probs_TE.float().sum(0)) / n_tokens
    return E * (f_E.detach() * P_E).sum()


def z_loss(gate: Gate, logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over the global batch of logsumexp(logits)^2."""
    n_tokens = gate.global_count(logits_TE.shape[0], logits_TE.device)
    return gate.global_sum(logits_TE.float().logsumexp(-1).square().sum()) / n_tokens


def entropy(gate: Gate, probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy (nats) of a router distribution, over the global batch (detached)."""
    with torch.no_grad():
        p = probs_TE.float()
        h = -(p * p.clamp_min(1e-12).log()).sum(-1)
        return gate.global_sum(h.sum()) / gate.global_count(p.shape[0], p.device)


_UNRESOLVED = object()
_topk = _UNRESOLVED


def _topk_kernel():
    """moeflow's Triton top-k, or None without Triton; resolved once. A module global, not functools.cache:
    torch.compile traces through a cache wrapper and warns about it in every compiled run."""
    global _topk
    if _topk is _UNRESOLVED:
        try:  # Triton is an optional dependency
            import triton  # noqa: F401
        except ImportError:
            _topk = None
        else:  # with Triton, a broken kernel module is an error, not a silent fallback
            from moeflow.kernels.topk import topk_indices

            _topk = topk_indices
    return _topk


def top_k_indices(select_TE: torch.Tensor, k: int) -> torch.Tensor:
    """select_TE.topk(k, dim=-1).indices (no gradient): on the GPU through moeflow's one-pass Triton
    kernel when Triton is installed (torch.topk takes ~10x longer on router-sized rows)."""
    kernel = _topk_kernel() if select_TE.is_cuda else None
    return kernel(select_TE, k) if kernel is not None else select_TE.detach().topk(k, dim=-1).indices


def global_fraction(gate: Gate, part: int | torch.Tensor, whole: int | torch.Tensor, device) -> torch.Tensor:
    """sum(part) / sum(whole) over the token group (detached)."""

    def on_device(v):  # python numbers by a fill kernel: torch.tensor(v, device="cuda") is a synchronising copy
        return (
            v.to(device=device, dtype=torch.float32)
            if isinstance(v, torch.Tensor)
            else torch.full((), float(v), device=device)
        )

    pw = torch.stack([on_device(part), on_device(whole)])
    pw = gate.global_sum(pw)
    return (pw[0] / pw[1].clamp_min(1)).detach()
