"""launcher=local: torchrun's elastic launcher starts N real processes that train one run (gloo)."""

import pytest

from helpers.launch import QUICK, moeflow, val_losses
from helpers.timeouts import limit

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_local_launcher_runs_two_processes_into_one_run_dir(tmp_path):
    run = tmp_path / "run"
    done = moeflow("train", "launcher=local", "launcher.nproc=2", *QUICK, f"hydra.run.dir={run}", timeout=limit(180))
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "rank 0/2 up" in log and "rank 1/2 up" in log and "world 2" in log
    losses = val_losses(log)
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000005", "step_00000010"]
    assert not list(tmp_path.glob("outputs")), "every rank must write into the launcher's run dir"


def test_local_launcher_rejects_zero_processes(tmp_path):
    done = moeflow("train", "launcher=local", "launcher.nproc=0", f"hydra.run.dir={tmp_path}", timeout=limit(60))
    assert done.returncode == 2 and "launcher.nproc=0 is not valid: it takes an integer >= 1" in done.stderr
