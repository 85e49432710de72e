"""A stalled rank (SIGSTOP) fails the job within trainer.collective_timeout, naming that rank."""
from __future__ import annotations

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
from moeflow.launch.engines.torch_engine import TorchEngine
real = TorchEngine.optimizer_step
def optimizer_step(self, _n=[0]):
    _n[0] += 1
    if _n[0] == 3 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGSTOP)  # this rank freezes; its peers wait in the next collective
    return real(self)
TorchEngine.optimizer_step = optimizer_step
from moeflow.launch.cli import main
main(sys.argv[1:])
"""


def test_a_stopped_rank_is_named_within_the_collective_timeout(tmp_path):
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), "train", *TINY,
           "trainer.steps=20", "trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.collective_timeout=8", f"hydra.run.dir={tmp_path / 'run'}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit(180), env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    took = time.monotonic() - start
    assert proc.returncode != 0
    line = next((ln for ln in proc.stderr.splitlines() if "moeflow train: error: rank 0: a collective waited more than" in ln), None)
    assert line is not None, proc.stderr[-3000:]
    assert "trainer.collective_timeout=8" in line and "stalled: rank 1 (silent for" in line, line
    assert took < limit(120), took  # bounded: without a timeout rank 0 would wait forever
