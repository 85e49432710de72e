"""Context parallelism's attention equals full causal attention (float64), forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeflow.moe.errors import ConfigError
from moeflow.parallel.context_parallel import (
    attend_blocks,
    check_sequence,
    shard_positions,
    shard_sequence,
    unshard_sequence,
)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_shards_are_load_balanced_chunks_with_their_true_positions(cp):
    S = 8 * cp
    x = torch.arange(S).view(1, S)
    shards = [shard_sequence(x, r, cp) for r in range(cp)]
    assert torch.equal(unshard_sequence(shards), x)
    c = S // (2 * cp)
    for r, t in enumerate(shards):
        assert t.tolist()[0] == [*range(r * c, (r + 1) * c), *range((2 * cp - 1 - r) * c, (2 * cp - r) * c)]
        assert torch.equal(shard_positions(S, r, cp), t[0])
    # every rank does the same causal work: the sum of (position + 1) over its tokens
    work = {int((shard_positions(S, r, cp) + 1).sum()) for r in range(cp)}
    assert len(work) == 1


def test_a_sequence_the_shards_cannot_split_evenly_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="data.seq_len=12 is not divisible by 2 x parallel.cp = 8") as err:
        check_sequence(12, 4)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("cp, heads, kv_heads", [(1, 2, 2), (2, 4, 4), (4, 4, 2), (3, 6, 1)])
def test_blockwise_attention_over_emulated_ranks_equals_full_attention(cp, heads, kv_heads):
    gen = torch.Generator().manual_seed(cp)
    B, S, d = 2, 4 * cp, 8
    q = torch.randn(B, heads, S, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, kv_heads, S, d, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, kv_heads, S, d, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, heads, S, d, generator=gen, dtype=torch.float64)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)
    ref = torch.autograd.grad((full * g).sum(), (q, k, v))

    pos = [shard_positions(S, r, cp) for r in range(cp)]
    blocks = [(shard_sequence(k, r, cp, 2), shard_sequence(v, r, cp, 2), pos[r]) for r in range(cp)]
    outs = [attend_blocks(shard_sequence(q, r, cp, 2), pos[r], blocks) for r in range(cp)]
    out = unshard_sequence(outs, dim=2)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    torch.testing.assert_close(out, full, rtol=0, atol=1e-12)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_blocks_under_bf16_autocast_are_computed_in_float32():
    """The engine's forward runs under bf16 autocast (the default on GPUs): the blocks must not fall to bf16."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=gen) for _ in range(3))
    pos = [shard_positions(16, r, 2) for r in range(2)]
    blocks = [(shard_sequence(k, r, 2, 2), shard_sequence(v, r, 2, 2), pos[r]) for r in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unshard_sequence([attend_blocks(shard_sequence(q, r, 2, 2), pos[r], blocks) for r in range(2)], dim=2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=1e-5)


@pytest.mark.multiprocess
@pytest.mark.parametrize("world, heads, kv_heads", [(2, 4, 4), (4, 4, 2)])
def test_cp_attention_over_gloo_ranks_equals_full_attention(tmp_path, world, heads, kv_heads):
    from helpers import ep_workers as W

    for rank, diffs in enumerate(W.spawn("helpers.cp_workers:attention_case", world, tmp_path, heads, kv_heads)):
        assert all(d < 1e-12 for d in diffs.values()), (rank, diffs)


def test_a_32k_token_sequence_comes_from_a_memmap_file_and_shards_by_rank(tmp_path):
    """data=memmap reads only the windows it samples (a 32k-token window is 256 KiB of int64 ids per
    sequence, whatever the file's size); each CP rank keeps its two chunks of it, in order."""
    import numpy as np

    from moeflow.launch.data import BatchSampler, load_memmap

    tokens = np.arange(70_000, dtype=np.uint32)  # every id once: a window's first id says where it starts
    tokens.tofile(tmp_path / "train.bin")
    splits = load_memmap(str(tmp_path / "train.bin"), None, "uint32", 5)
    x, y = BatchSampler(splits.train, 32_768, 1, seed=0).batch(step=0, micro=0)
    assert x.shape == y.shape == (1, 32_768) and torch.equal(x[:, 1:], y[:, :-1])
    start = int(x[0, 0])
    assert torch.equal(x[0], torch.from_numpy(tokens[start : start + 32_768].astype(np.int64)))
    shards = [shard_sequence(x, r, 4) for r in range(4)]
    assert all(s.shape == (1, 8192) for s in shards) and torch.equal(unshard_sequence(shards), x)


def test_a_global_batch_counts_a_cp_group_as_one_data_parallel_rank():
    """data.global_batch_size on 4 ranks with cp=2: two data-parallel ranks read batches, so 8 sequences of
    2 per micro-batch take grad_accum=2 (not 1, as if all 4 ranks read their own)."""
    from helpers.config import compose_cfg
    from moeflow.launch.config import trainer_config
    from moeflow.launch.train import derive_grad_accum

    cfg = compose_cfg("parallel.cp=2", "data.batch_size=2", "data.global_batch_size=8")
    tc = trainer_config(cfg)
    derive_grad_accum(cfg, tc, world=4)
    assert tc.grad_accum == 2
