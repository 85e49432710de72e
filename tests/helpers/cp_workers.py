"""Context-parallel attention over gloo ranks against full attention (float64)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moeflow.parallel.context_parallel import cp_attention, shard_sequence, unshard_sequence


def attention_case(rank: int, world: int, heads: int, kv_heads: int) -> dict:
    """Every rank draws the same q/k/v, keeps its shards, runs cp_attention over the world, backprops a
    fixed output gradient; the gathered outputs and gradients are compared with full attention."""
    gen = torch.Generator().manual_seed(0)
    B, S, d = 2, 8 * world, 4
    q = torch.randn(B, heads, S, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, kv_heads, S, d, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, kv_heads, S, d, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, heads, S, d, generator=gen, dtype=torch.float64)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)
    (full * g).sum().backward()
    want = {"out": full.detach(), "q": q.grad, "k": k.grad, "v": v.grad}

    mine = {
        n: shard_sequence(t.detach(), rank, world, dim=2).requires_grad_() for n, t in (("q", q), ("k", k), ("v", v))
    }
    out = cp_attention(mine["q"], mine["k"], mine["v"], rank, dist.group.WORLD)
    (out * shard_sequence(g, rank, world, dim=2)).sum().backward()
    got = {"out": out.detach(), **{n: t.grad for n, t in mine.items()}}
    diffs = {}
    for name, t in got.items():
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        diffs[name] = (unshard_sequence(parts, dim=2) - want[name]).abs().max().item()
    return diffs
