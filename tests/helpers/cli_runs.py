"""Running `moeflow train` (or torchrun over it) as a subprocess in tests, and reading what it warned."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers.timeouts import limit

REPO = Path(__file__).resolve().parents[2]

SMALL = [
    "data.max_bytes=200000",
    "data.batch_size=2",
    "data.seq_len=32",
    "trainer.progress=false",
    "trainer.eval_batches=1",
]


def train_cmd(*overrides: str, nproc: int = 1) -> list[str]:
    """`moeflow train OVERRIDES` as this interpreter runs it; with nproc > 1 under torchrun (--standalone)."""
    torchrun = ["torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m"] if nproc > 1 else []
    return [sys.executable, "-m", *torchrun, "moeflow.launch.cli", "train", *overrides]


def run_cmd(cmd: list[str], cwd: Path, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` with one intra-op thread per process; fail the test with its stderr's tail if it fails."""
    timeout = limit(240) if timeout is None else timeout
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def moeflow_warnings(stderr: str) -> list[str]:
    """Warning lines whose source is a moeflow module ("<path>:<line>: SomeWarning: ...")."""
    return [
        line
        for line in stderr.splitlines()
        if "Warning:" in line and line.startswith(str(REPO)) and "/tests/" not in line
    ]
