"""What a log point reads from the device, read cheaply: the routing statistics in one copy
(parallel/routing_stats.py) and tied router rows by fingerprint (launch/routing_health.py), each
against the plain reading it replaces."""

from __future__ import annotations

import pytest
import torch

from moeflow.launch.routing_health import tied_router_rows
from moeflow.parallel.routing_stats import gathered_to_host, routing_stats_to_host


def test_one_copy_gives_every_statistic_exactly_with_its_dtype_and_shape():
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.rand((), generator=g),
        torch.randint(0, 2**40, (64,), generator=g),  # token counts beyond float32's 24 bits
        torch.randn(3, 5, generator=g).bfloat16(),
        torch.tensor(float("nan")),
        torch.zeros(0),
    ]
    for got, want in zip(gathered_to_host(tensors), tensors, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and got.device.type == "cpu"
        assert torch.equal(got, want) or (got.isnan().all() and want.isnan().all())


def test_statistics_already_on_the_host_are_left_as_they_are():
    from moeflow.moe.config import ModelConfig
    from moeflow.moe.model import Transformer

    model = Transformer(ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4, max_seq_len=8))
    model(torch.randint(0, 256, (2, 8)))
    before = [layer.last_stats for layer in model.moe_layers()]
    routing_stats_to_host(model)
    assert [layer.last_stats for layer in model.moe_layers()] == before  # the same dicts: nothing copied


class _Layer(torch.nn.Module):
    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.gate = torch.nn.Module()
        self.gate.weight = torch.nn.Parameter(rows, requires_grad=False)
        self.experts = torch.nn.Module()
        self.experts.num_experts = rows.shape[0]


def _brute_force(rows: torch.Tensor) -> set[tuple[int, int]]:
    n = rows.shape[0]
    return {(i, j) for i in range(n) for j in range(i + 1, n) if torch.equal(rows[i], rows[j])}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("seed", range(4))
def test_tied_rows_are_found_as_brute_force_finds_them(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(16, 24, generator=g).to(dtype)
    if seed % 2:  # plant copies: the first tied pair by index is what the warning names
        for src, dst in ((3, 11), (5, 9), (3, 14)):
            rows[dst] = rows[src]
    found = tied_router_rows(_Layer(rows))
    pairs = _brute_force(rows)
    assert (found is None) == (not pairs)
    if pairs:
        assert found in pairs and found == min(pairs, key=lambda p: (p[1], p[0]))


def test_rows_that_differ_in_one_bit_are_not_tied():
    rows = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    rows[6] = rows[2]
    rows[6, 17] = torch.nextafter(rows[6, 17], torch.tensor(float("inf")))
    assert tied_router_rows(_Layer(rows)) is None
