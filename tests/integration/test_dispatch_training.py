"""parallel.dispatcher in the trainer: one process runs a named transport over an EP group of one
rank (the multi-rank code path, gloo on CPU) and trains exactly like the local dispatcher; a
capacity that drops too much warns once, with the numbers, and the drops are logged."""

import json
import warnings

import pytest

from helpers.config import TINY, compose_cfg
from moeflow.launch.train import train

STEPS = ["trainer.steps=4", "trainer.eval_every=4", "trainer.log_every=2", "trainer.ckpt_every=0"]


def test_alltoall_over_a_group_of_one_trains_like_the_local_dispatcher(tmp_path):
    local = train(compose_cfg(*TINY, *STEPS), tmp_path / "local")
    routed = train(compose_cfg(*TINY, *STEPS, "parallel.dispatcher=alltoall"), tmp_path / "alltoall")
    assert routed["step"] == local["step"] == 4
    assert abs(routed["train_loss"] - local["train_loss"]) < 1e-4, (routed, local)
    assert abs(routed["val_loss"] - local["val_loss"]) < 1e-4, (routed, local)


def test_a_capacity_that_drops_too_much_warns_once_and_is_logged(tmp_path):
    cfg = compose_cfg(*TINY, *STEPS, "parallel.dispatcher=capacity", "parallel.capacity_factor=0.3")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(cfg, tmp_path)
    drops = [str(w.message) for w in seen if "parallel.dispatcher=capacity dropped" in str(w.message)]
    assert len(drops) == 1, drops  # once per run, whichever layer crossed the line first
    assert "parallel.capacity_factor=0.3" in drops[0] and "raise parallel.capacity_factor" in drops[0]
    rows = [json.loads(line) for line in (tmp_path / "routing_stats.jsonl").read_text().splitlines()]
    assert rows and all(r["dispatch_dropped_fraction"] > 0.3 for r in rows), rows[:2]


@pytest.mark.parametrize(
    "override, message",
    [
        ("parallel.dispatcher=nccl", "parallel.dispatcher"),
        ("parallel.dispatcher=symm_mem", "parallel.dispatcher=symm_mem is unavailable: it needs CUDA"),
        ("parallel.capacity_factor=0", "parallel.capacity_factor"),
    ],
)
def test_bad_dispatcher_settings_fail_before_any_work(tmp_path, override, message):
    from moeflow.moe.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        train(compose_cfg(*TINY, *STEPS, override), tmp_path)
    assert not (tmp_path / "routing_stats.jsonl").exists()


def test_optimizer_groups_never_mix_plain_tensors_and_dtensors(tmp_path):
    """With a named transport in one process the dense layers are FSDP DTensors (a mesh of one)
    and the experts plain tensors: AdamW's multi-tensor path (CUDA's default, forced here) must
    see them in separate groups, or it raises 'got mixed torch.Tensor and DTensor'."""
    import torch

    from moeflow.launch.config import validate
    from moeflow.launch.engines.torch_engine import TorchEngine
    from moeflow.launch.optim import optimizer_groups

    cfg = compose_cfg(*TINY, "parallel.dispatcher=capacity")
    model_cfg, trainer_cfg = validate(cfg)
    env, device = TorchEngine.start(cfg, trainer_cfg)
    engine = TorchEngine(cfg, model_cfg, trainer_cfg, env, device, tmp_path)
    kinds = {type(p).__name__ for p in engine.model.parameters()}
    assert kinds == {"DTensor", "Parameter"}, kinds  # the case this test is about
    groups = optimizer_groups(engine.model, 0.1)
    assert all(len({type(p) for p in g["params"]}) == 1 for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(engine.model.parameters()))
    x = torch.randint(0, model_cfg.vocab_size, (2, 9))
    engine.forward_backward(x[:, :-1], x[:, 1:], last=True)
    torch.optim.AdamW(groups, lr=1e-3, foreach=True).step()
    engine.close()
