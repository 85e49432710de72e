"""Pipeline parallelism's pieces that need no processes: the split, the micro-batch rules, the bubble
arithmetic, the aux-loss carrier's gradient (float64, against adding the loss directly) and the stage
model's names and values against the plain model's."""

from __future__ import annotations

import pytest
import torch

from moeflow.moe.config import ModelConfig
from moeflow.moe.errors import ConfigError
from moeflow.moe.model import Transformer
from moeflow.parallel.pipeline import (
    CarryAuxLoss,
    check_microbatches,
    model_split,
    predicted_bubble,
    schedule_kind,
    split_blocks,
    stage_models,
    stages_of_rank,
)


def test_balanced_split_minimises_the_largest_stage():
    # the embedding (first) and head (last) weigh like two blocks each: the middle stages take more blocks
    assert split_blocks([10] * 8, 4, first_cost=20, last_cost=20) == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert split_blocks([10] * 4, 2, 0, 0) == [[0, 1], [2, 3]]
    assert split_blocks([1, 1, 1, 9], 2, 0, 0) == [[0, 1, 2], [3]]
    # every block in exactly one stage, in order, for random costs
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        n, stages = int(torch.randint(2, 12, (1,), generator=gen)), int(torch.randint(1, 5, (1,), generator=gen))
        if stages > n:
            continue
        costs = torch.randint(1, 100, (n,), generator=gen).tolist()
        split = split_blocks(costs, stages, 30, 30)
        assert [b for s in split for b in s] == list(range(n)) and all(split)
        worst = max(sum(costs[i] for i in s) + 30 * (k == 0) + 30 * (k == stages - 1) for k, s in enumerate(split))
        # no split is better: brute force over cut points for small n
        if n <= 8:
            import itertools

            best = min(
                max(
                    sum(costs[a:b]) + 30 * (k == 0) + 30 * (k == stages - 1)
                    for k, (a, b) in enumerate(zip((0, *cuts), (*cuts, n)))
                )
                for cuts in itertools.combinations(range(1, n), stages - 1)
            )
            assert worst == best


def test_a_user_split_is_taken_or_refused_in_one_line():
    assert split_blocks([1] * 4, 2, 0, 0, layers=[1, 3]) == [[0], [1, 2, 3]]
    assert split_blocks([1] * 4, 2, 0, 0, layers=2) == [[0, 1], [2, 3]]
    for layers in ([2, 1], [0, 4], 3, [1, 1, 2]):
        with pytest.raises(ConfigError, match="pp_layers_per_stage") as e:
            split_blocks([1] * 4, 2, 0, 0, layers=layers)
        assert "\n" not in str(e.value) and "[2, 2]" in str(e.value)
    with pytest.raises(ConfigError, match="4 pipeline stages for 3 blocks"):
        split_blocks([1] * 3, 4, 0, 0)


def test_micro_batch_rules():
    assert check_microbatches(-1, 8, 4, "1f1b") == 4
    assert check_microbatches(-1, 8, 2, "interleaved_1f1b") == 4  # one per stage: 2 per rank
    with pytest.raises(ConfigError, match="does not divide data.batch_size=6"):
        check_microbatches(4, 6, 2, "1f1b")
    with pytest.raises(ConfigError, match="at least as many micro-batches as stages"):
        check_microbatches(2, 8, 4, "1f1b")
    assert check_microbatches(2, 8, 4, "gpipe") == 2
    assert check_microbatches(10, 20, 4, "interleaved_1f1b") == 10  # torch's flexible rounds: 2 of 5
    with pytest.raises(ConfigError, match="is not divisible by 2"):
        check_microbatches(9, 18, 4, "interleaved_1f1b")
    with pytest.raises(ConfigError, match="pp_schedule='pipedream' is unknown"):
        schedule_kind("pipedream")


def test_stages_of_each_rank():
    assert [stages_of_rank(r, 4, schedule_kind("1f1b")) for r in range(4)] == [[0], [1], [2], [3]]
    assert [stages_of_rank(r, 2, schedule_kind("interleaved_1f1b")) for r in range(2)] == [[0, 2], [1, 3]]
    assert [stages_of_rank(r, 2, schedule_kind("zbv")) for r in range(2)] == [[0, 3], [1, 2]]


def test_predicted_bubble():
    assert predicted_bubble("1f1b", 4, 4) == pytest.approx(3 / 7)  # (p-1)/(m+p-1)
    assert predicted_bubble("1f1b", 4, 32) == pytest.approx(3 / 35)
    assert predicted_bubble("interleaved_1f1b", 4, 8) == pytest.approx(1.5 / 9.5)
    assert predicted_bubble("1f1b", 1, 8) == 0.0


def test_carried_aux_loss_gets_the_loss_scale_as_gradient():
    """Backward through the carrier equals backward of (output-loss + aux) * scale, in float64."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    g = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    scale = 0.125

    def parts():
        h = x @ w
        aux = (h.softmax(-1) ** 2).sum()
        return h, aux

    h, aux = parts()
    ((h * g).sum() * scale + aux * scale).backward()
    want = w.grad.clone()
    w.grad = None
    h, aux = parts()
    out = CarryAuxLoss.apply(h, aux, scale)
    assert out.dtype == torch.float32 and out._base is None  # a new tensor: schedules detach it in place
    (out.double() * g).sum().mul(scale).backward()
    assert torch.allclose(w.grad, want, rtol=1e-6, atol=1e-7)  # the float32 boundary costs 1e-7


def test_stages_keep_the_plain_models_names_and_compute_its_logits():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=4, n_heads=2, d_ff=16, num_experts=4, top_k=2, max_seq_len=8)
    model = Transformer(cfg)
    split = model_split(model, 3)
    chunks, union = stage_models(model, split, [0, 1, 2])
    names = [n for c in chunks for n, _ in c.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert sorted(n for n, _ in union.named_parameters()) == sorted(names)
    tokens = torch.randint(0, 32, (2, 8))
    x = tokens
    for chunk in chunks:
        x = chunk(x)
    assert torch.allclose(x, model(tokens), atol=1e-6)


def test_a_global_batch_counts_a_pipeline_as_one_data_parallel_rank():
    """data.global_batch_size on 4 ranks with pp=2: two data-parallel ranks read batches (both stages of a
    pipeline read the same one), so 16 sequences of 4 per micro-step take grad_accum=2."""
    from helpers.config import compose_cfg
    from moeflow.launch.config import trainer_config
    from moeflow.launch.train import derive_grad_accum

    cfg = compose_cfg("parallel.pp=2", "data.batch_size=4", "data.global_batch_size=16")
    tc = trainer_config(cfg)
    derive_grad_accum(cfg, tc, world=4)
    assert tc.grad_accum == 2
