"""A stalled rank (SIGSTOP) fails the job within trainer.collective_timeout, naming that rank."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import pytest

from helpers.config import TINY
from helpers.timeouts import limit

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STALL = """
import os, signal, sys
where = os.environ["STALL_IN"]
def freeze_once(real, at):
    def wrapped(*args, _n=[0], **kwargs):
        _n[0] += 1
        if _n[0] == at and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGSTOP)  # this rank freezes; its peers wait in the next collective
        return real(*args, **kwargs)
    return wrapped
if where == "step":
    from moeflow.launch.engines.torch_engine import TorchEngine
    TorchEngine.optimizer_step = freeze_once(TorchEngine.optimizer_step, 3)
else:  # inside a checkpoint write: a sync save, or an async one's background thread
    from moeflow.parallel.checkpoint import SafetensorsShardWriter
    SafetensorsShardWriter.write_data = freeze_once(SafetensorsShardWriter.write_data, 1)
from moeflow.launch.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("where", ["step", "sync_save", "async_save"])
def test_a_stopped_rank_is_named_within_the_collective_timeout(tmp_path, where):
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    saves = {
        "step": ["trainer.ckpt_every=0"],
        "sync_save": ["trainer.ckpt_every=2"],
        "async_save": ["trainer.ckpt_every=2", "trainer.async_checkpoint=true"],
    }[where]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
        "train",
        *TINY,
        "trainer.steps=20",
        "trainer.eval_every=0",
        *saves,
        "trainer.collective_timeout=8",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    start = time.monotonic()
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=limit(180),
        env={**os.environ, "OMP_NUM_THREADS": "1", "STALL_IN": where},
        cwd=tmp_path,
    )
    took = time.monotonic() - start
    assert proc.returncode != 0
    line = next(
        (ln for ln in proc.stderr.splitlines() if "moeflow train: error: rank 0: a collective waited more than" in ln),
        None,
    )
    assert line is not None, proc.stderr[-3000:]
    assert "trainer.collective_timeout=8" in line and "stalled: rank 1 (silent for" in line, line
    assert took < limit(120), took  # bounded: without a timeout rank 0 would wait forever


def test_ranks_exit_when_their_launcher_is_killed(tmp_path):
    """SIGKILL to torchrun alone (not its ranks): the ranks die with it instead of training on."""
    psutil = pytest.importorskip("psutil")
    import signal

    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "moeflow.launch.cli",
        "train",
        *TINY,
        "trainer.steps=1000000",
        "trainer.eval_every=0",
        "trainer.ckpt_every=0",
        f"hydra.run.dir={run}",
    ]
    launcher = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    ranks = []
    try:
        deadline = time.monotonic() + limit(120)
        while time.monotonic() < deadline and not (run / ".moeflow-run.lock").exists():
            time.sleep(0.2)  # rank 0 took the run dir: the ranks are training
        ranks = [
            p
            for p in psutil.Process(launcher.pid).children(recursive=True)
            if "moeflow.launch.cli" in " ".join(p.cmdline())
        ]
        assert len(ranks) == 2, [p.cmdline() for p in ranks]
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        _, alive = psutil.wait_procs(ranks, timeout=limit(15))
        assert not alive, f"ranks still running after their launcher died: {[p.pid for p in alive]}"
    finally:
        for p in ranks:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        if launcher.poll() is None:
            launcher.kill()
