"""The log point's device reads on a real GPU: the routing statistics copied in one transfer equal
each read on its own, and tied router rows are found on CUDA tensors as on the CPU."""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from moeflow.launch.routing_health import tied_router_rows  # noqa: E402
from moeflow.moe.config import ModelConfig  # noqa: E402
from moeflow.moe.model import Transformer  # noqa: E402
from moeflow.parallel.routing_stats import routing_stats_to_host  # noqa: E402


def test_one_copy_equals_each_read_and_finds_ties_on_cuda():
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(d_model=64, n_layers=3, n_heads=4, d_ff=64, num_experts=16, top_k=4, max_seq_len=32)
    )
    model = model.cuda()
    model(torch.randint(0, model.cfg.vocab_size, (4, 32), device="cuda"))
    want = [{k: v.cpu() for k, v in layer.last_stats.items()} for layer in model.moe_layers()]
    routing_stats_to_host(model)
    for layer, expected in zip(model.moe_layers(), want, strict=True):
        got = layer.last_stats
        assert got.keys() == expected.keys()
        for k in got:
            assert (
                got[k].device.type == "cpu" and got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k])
            ), k
    layer = model.moe_layers()[1]
    assert tied_router_rows(layer) is None
    with torch.no_grad():
        for p in layer.gate.parameters():
            if p.dim() == 2 and p.shape[0] == 16:
                p[9].copy_(p[4])
    assert tied_router_rows(layer) == (4, 9)
