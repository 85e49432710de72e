"""Context parallelism's attention: each rank of a CP group holds 1/cp of every sequence; attention stays exact.

Load-balanced causal sharding (torchtitan's and Megatron-Core's): a sequence of S tokens is cut into
2*cp chunks and rank r keeps chunks r and 2*cp-1-r, so under the causal mask every rank has the same
work. A rank's tokens keep their true positions (`shard_positions`): the rotary embedding and the
causal mask use them.

Attention: the queries stay on their rank; every rank's keys and values (and positions) are gathered
over the group (differentiably: the backward returns each rank's key and value gradients to it), and
the local queries attend to them one rank's block at a time, each block's partial result merged into
the running one by the online-softmax rule (`merge`, the one place it is written). The result equals
full causal attention over the whole sequence (tests/unit/test_context_parallel.py checks it in
float64, forward and backward, also over gloo ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moeflow.moe.errors import ConfigError


def check_sequence(seq_len: int, cp: int) -> None:
    if seq_len % (2 * cp):
        raise ConfigError(
            f"data.seq_len={seq_len} is not divisible by 2 x parallel.cp = {2 * cp} (each CP rank holds two "
            f"equal chunks of every sequence); pick a seq_len that is a multiple of {2 * cp}"
        )


def _chunks(cp_rank: int, cp: int) -> tuple[int, int]:
    return cp_rank, 2 * cp - 1 - cp_rank


def shard_sequence(t: torch.Tensor, cp_rank: int, cp: int, dim: int = 1) -> torch.Tensor:
    """This rank's two chunks (r and 2*cp-1-r) of every sequence along `dim`."""
    check_sequence(t.shape[dim], cp)
    parts = t.chunk(2 * cp, dim)
    a, b = _chunks(cp_rank, cp)
    return torch.cat([parts[a], parts[b]], dim)


def unshard_sequence(shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The whole sequences from every rank's `shard_sequence` (in rank order)."""
    cp = len(shards)
    chunks: list[torch.Tensor | None] = [None] * (2 * cp)
    for r, t in enumerate(shards):
        first, second = t.chunk(2, dim)
        a, b = _chunks(r, cp)
        chunks[a], chunks[b] = first, second
    return torch.cat(chunks, dim)


def shard_positions(seq_len: int, cp_rank: int, cp: int, device=None) -> torch.Tensor:
    """The true positions of this rank's tokens (`shard_sequence` of 0..seq_len-1)."""
    return shard_sequence(torch.arange(seq_len, device=device), cp_rank, cp, dim=0)


def attend_block(q, k, v, q_pos, k_pos, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of queries q [B, H, Sq, d] to one block of keys/values [B, H, Sk, d] by true positions:
    (output [B, H, Sq, d], log-sum-exp of the scores [B, H, Sq]), both in float32 at least (bf16 inputs are
    multiplied and normalised in float32, as fused attention kernels do). Hidden keys score the lowest finite
    float, not -inf: a row that sees no key of this block gets an lse so low that `merge` gives it weight
    exactly 0, with no inf - inf anywhere (every query sees at least itself, in its own rank's block)."""
    if k.shape[1] != q.shape[1]:  # GQA: each group of query heads shares one key/value head (repeated here,
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))  # inside the recomputation)
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):  # bf16 autocast would run these products in bf16
        scores = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale
        visible = k_pos.view(1, -1) <= q_pos.view(-1, 1)  # [Sq, Sk]
        scores = scores.masked_fill(~visible, torch.finfo(dtype).min)
        lse = torch.logsumexp(scores, dim=-1)
        return torch.exp(scores - lse.unsqueeze(-1)) @ v.to(dtype), lse


def merge(out_a, lse_a, out_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial attentions of the same queries over disjoint key sets, as one (the online-softmax rule):
    each weighted by its share exp(lse_i - lse) of the combined normaliser."""
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a * torch.exp(lse_a - lse).unsqueeze(-1) + out_b * torch.exp(lse_b - lse).unsqueeze(-1)
    return out, lse


def attend_blocks(q, q_pos, blocks, scale: float | None = None) -> torch.Tensor:
    """Local queries over key/value blocks [(k, v, k_pos), ...], merged one block at a time (GQA: k/v may have
    fewer heads than q). Each block's scores live only while it is computed (recomputed for the backward)."""
    from torch.utils.checkpoint import checkpoint

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = lse = None
    for k, v, k_pos in blocks:
        # the block's scores (S/cp x S/cp per head) are recomputed in the backward, not kept: what stays
        # per block is its output and log-sum-exp, O(S/cp) per head
        o, s = checkpoint(attend_block, q, k, v, q_pos, k_pos, scale, use_reentrant=False)
        out, lse = (o, s) if out is None else merge(out, lse, o, s)
    return out.to(q.dtype)


def cp_attention(q, k, v, cp_rank: int, group) -> torch.Tensor:
    """Exact causal attention of this rank's queries over the whole sequences of the CP `group`:
    q [B, H, S/cp, d], k/v [B, H_kv, S/cp, d] (this rank's `shard_sequence` shards)."""
    import torch.distributed as dist
    from torch.distributed import _functional_collectives as fc

    cp = dist.get_world_size(group)
    S = q.shape[2] * cp
    kv = torch.stack([k, v])  # one collective for both (its backward: one reduce-scatter of their gradients)
    # differentiable all-gather along dim 0 (torch 2.13 renamed it; 2.11 has the older name only)
    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    gathered = gather(kv, gather_dim=0, group=group).view(cp, 2, *k.shape)
    positions = [shard_positions(S, r, cp, q.device) for r in range(cp)]
    return attend_blocks(q, positions[cp_rank], [(gathered[r, 0], gathered[r, 1], positions[r]) for r in range(cp)])


@torch.no_grad()
def gather_sequence(t: torch.Tensor, shard, dim: int = 1) -> torch.Tensor:
    """Every CP rank's shard of `t` (e.g. logits), back in sequence order on every rank (no gradient)."""
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(shard.cp)]
    dist.all_gather(parts, t.contiguous(), group=shard.group)
    return unshard_sequence(parts, dim)


@dataclass(frozen=True)
class SequenceShard:
    """What `parallelize` sets on every attention layer under parallel.cp > 1 (`Attention.sequence_shard`)."""

    group: object
    rank: int
    cp: int

    def shard(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return shard_sequence(t, self.rank, self.cp, dim)

    def positions(self, local_len: int, device) -> torch.Tensor:
        return shard_positions(local_len * self.cp, self.rank, self.cp, device)

    def attend(self, q, k, v) -> torch.Tensor:
        return cp_attention(q, k, v, self.rank, self.group)
