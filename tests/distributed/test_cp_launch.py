"""Context parallelism from the command line: torchrun parallel.cp=2 follows the single-process run,
and checkpoints move between cp=1 and cp=2 in both directions."""

from __future__ import annotations

import json
import re

import pytest

from helpers.cli_runs import SMALL, moeflow_warnings, train_cmd
from helpers.cli_runs import run_cmd as _run
from helpers.config import assert_refused_in_one_line

pytestmark = pytest.mark.multiprocess

RUN = ["trainer.log_every=1", "trainer.eval_every=0", "trainer.ckpt_every=2", "trainer.keep_checkpoints=0"]


def _train(tmp_path, run_dir, *overrides: str, cp: int = 1):
    return _run(train_cmd(*RUN, *SMALL, f"hydra.run.dir={run_dir}", *overrides, nproc=cp), tmp_path)


def _losses(run_dir) -> dict[int, float]:
    found = re.findall(r"step (\d+)/\d+, loss ([0-9.]+)", (run_dir / "train.log").read_text())
    return {int(s): float(v) for s, v in found}


def _done(run_dir) -> dict:
    return json.loads((run_dir / "train.log").read_text().split("done: ", 1)[1].split("; run dir")[0])


def test_cp2_follows_one_process_and_checkpoints_move_between_cp_sizes(tmp_path):
    one = tmp_path / "one"
    _train(tmp_path, one, "trainer.steps=5")
    # cp=2 picks up the single-process checkpoint of step 2 (resharded on load) and trains to step 4
    cp2 = tmp_path / "cp2"
    proc = _train(
        tmp_path, cp2, "parallel.cp=2", "trainer.steps=4", f"resume={one / 'checkpoints' / 'step_00000002'}", cp=2
    )
    assert not moeflow_warnings(proc.stderr), moeflow_warnings(proc.stderr)
    log = (cp2 / "train.log").read_text()
    assert "cp 2" in log and "resumed from" in log, log[-2000:]
    a, b = _losses(one), _losses(cp2)
    assert set(b) == {3, 4}
    assert all(abs(a[s] - b[s]) <= 2e-4 for s in b), (a, b)  # printed to 4 decimals
    # and one process picks up the cp=2 checkpoint of step 4 and ends where the uninterrupted run did
    back = tmp_path / "back"
    _train(tmp_path, back, "trainer.steps=5", f"resume={cp2 / 'checkpoints' / 'step_00000004'}")
    want, got = _done(one), _done(back)
    assert got["step"] == 5 and got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4), (want, got)


def test_context_parallel_refuses_what_it_cannot_run_in_one_line():
    cases = [
        (["parallel.cp=2", "data.seq_len=30"], "data.seq_len=30 is not divisible by 2 x parallel.cp = 4"),
        (["parallel.cp=2", "engine=deepspeed"], "engine=deepspeed has no context parallelism"),
        (["parallel.cp=3"], "parallel.cp=3 x parallel.tp=1 does not divide the world size 2"),
        (["parallel.cp=2", "trainer.activation_checkpointing=selective"], "use trainer.activation_checkpointing=full"),
        (["parallel.cp=2", "gate=switch"], "gate.drop_policy=position with parallel.cp=2"),
    ]
    assert_refused_in_one_line(cases)
