"""A run whose loss or gradients become NaN/inf: it stops (exit 1), skips the step, or rolls back,
and it never writes (or prunes for) a non-finite checkpoint."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from helpers.config import TINY, compose_cfg
from helpers.timeouts import limit
from moeflow.launch import checkpoint as ckpt
from moeflow.launch.divergence import Diverged
from moeflow.launch.engines.torch_engine import TorchEngine
from moeflow.launch.train import train
from moeflow.parallel.checkpoint import read_full_tensors

QUICK = [*TINY, "trainer.eval_every=0", "trainer.log_every=1", "trainer.ckpt_every=1", "trainer.keep_checkpoints=2"]


def all_finite(ckpt_dir) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in read_full_tensors(ckpt_dir).values() if t.is_floating_point())


def test_a_diverging_run_stops_with_exit_1_and_keeps_its_good_checkpoints(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeflow.launch.cli",
            "train",
            *QUICK,
            "trainer.steps=20",
            "optim.lr=1e6",
            "optim.min_lr=1e5",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=limit(120),
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("moeflow train: error: training diverged at step") and "last good checkpoint is" in err
    kept = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert kept and all(all_finite(k) for k in kept)  # pruning never traded a good checkpoint for a NaN one
    assert str(kept[-1]) in err


def poison(monkeypatch, steps_to_poison: set[int], what: str):
    """Make the loss (and so every gradient) NaN at the given optimizer steps, on the first attempt only."""
    real = TorchEngine.forward_backward
    calls = {"n": 0}

    def forward_backward(self, x, y, last):
        step = calls["n"]
        calls["n"] += 1
        if step in steps_to_poison and not getattr(self, "_poisoned_" + str(step), False):
            setattr(self, "_poisoned_" + str(step), True)
            y = y.clone()
            loss, aux = real(self, x, y, last)
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.fill_(math.nan)
            return loss * math.nan if what == "loss" else loss, aux
        return real(self, x, y, last)

    monkeypatch.setattr(TorchEngine, "forward_backward", forward_backward)


def test_skip_step_skips_the_update_whose_gradient_is_not_finite(tmp_path, monkeypatch):
    poison(monkeypatch, {2}, "grad")
    result = train(compose_cfg(*QUICK, "trainer.steps=5", "trainer.on_nonfinite=skip_step"), tmp_path)
    assert result["step"] == 5 and math.isfinite(result["train_loss"])
    assert all_finite(ckpt.find_checkpoint(tmp_path))


def test_rollback_reloads_the_last_good_checkpoint_and_goes_on(tmp_path, monkeypatch, caplog):
    poison(monkeypatch, {3}, "loss")
    with caplog.at_level("WARNING", logger="moeflow.train"):
        result = train(compose_cfg(*QUICK, "trainer.steps=6", "trainer.on_nonfinite=rollback"), tmp_path)
    assert "rollback 1 of 3" in caplog.text and "step_00000003" in caplog.text
    assert result["step"] == 6 and math.isfinite(result["train_loss"])
    assert all(all_finite(k) for k in ckpt.list_checkpoints(tmp_path / "checkpoints"))


def test_rollback_gives_up_after_three_and_stops(tmp_path):
    with pytest.raises(Diverged, match="after 3 rollbacks"):
        train(
            compose_cfg(
                *QUICK, "trainer.steps=30", "optim.lr=1e6", "optim.min_lr=1e5", "trainer.on_nonfinite=rollback"
            ),
            tmp_path,
        )
