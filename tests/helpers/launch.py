"""Real clusters for the launcher tests: a private local Slurm (tests/fixtures/local-slurm.sh) and a local Ray head."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers.config import TINY
from helpers.timeouts import limit

ROOT = Path(__file__).resolve().parents[2]
BIN = str(Path(sys.executable).parent)
# A tiny, quick training run for launcher tests: val loss at steps 0, 5 and 10.
# Ray's token auth keeps its token in ~/.ray/auth_token, which other Ray users of this machine (same user)
# may regenerate at any time: the test clusters run without it.
ISOLATED = {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
QUICK = [*TINY, "trainer.steps=10", "trainer.eval_every=5", "trainer.eval_batches=1", "trainer.ckpt_every=5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moeflow(
    *args: str, timeout: float = 240, cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the real `moeflow` command line in a subprocess."""
    timeout = limit(240) if timeout is None else timeout
    full_env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **ISOLATED, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "moeflow.launch.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=full_env,
    )


def val_losses(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"val loss (\d+\.\d+)", log)]


# --- Slurm -------------------------------------------------------------------------------------

SLURM_FIXTURE = ROOT / "tests" / "fixtures" / "local-slurm.sh"
SLURM_STARTED = Path(os.environ.get("MOEFLOW_SLURM_STATE", ROOT / ".cache" / "slurm")) / "started-by-tests"


def stop_slurm_if_tests_started_it() -> None:
    """The daemons a test session started (never a cluster that was already up) stop with the session."""
    if SLURM_STARTED.exists():
        subprocess.run(["bash", str(SLURM_FIXTURE), "stop"], capture_output=True, timeout=60)
        SLURM_STARTED.unlink(missing_ok=True)


def slurm_cluster() -> None:
    """Start the private single-node Slurm cluster (idempotent) and point Slurm's clients at it
    (SLURM_CONF, inherited by every subprocess and job); or skip saying why not."""
    missing = [
        t
        for t in ("slurmctld", "slurmd", "munged", "sbatch")
        if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()
    ]
    if missing:
        pytest.skip(
            f"Slurm is not installed (missing {', '.join(missing)}): apt-get install slurmctld slurmd slurm-client munge, as .ci/run does"
        )
    if os.geteuid() != 0:
        up = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10).stdout
        if "idle" not in up and "mix" not in up:
            pytest.skip(
                "no Slurm cluster answers and starting one needs root: run `bash tests/fixtures/local-slurm.sh start` as root"
            )
        return
    done = subprocess.run(["bash", str(SLURM_FIXTURE), "start"], capture_output=True, text=True, timeout=limit(120))
    if done.returncode != 0:
        pytest.fail(f"could not start the local Slurm cluster: {done.stdout}{done.stderr}")
    if "slurm: up" in done.stdout:  # this test session started it: the session stops it (tests/conftest.py)
        SLURM_STARTED.parent.mkdir(parents=True, exist_ok=True)
        SLURM_STARTED.touch()
    env = subprocess.run(["bash", str(SLURM_FIXTURE), "env"], capture_output=True, text=True, check=True).stdout
    os.environ["SLURM_CONF"] = env.strip().split("=", 1)[1]


def job_id(stdout: str) -> str:
    m = re.search(r"submitted job (\S+)", stdout)
    assert m, stdout
    return m.group(1)


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    m = re.search(r"JobState=(\S+)", out)
    return m.group(1) if m else "UNKNOWN"


def wait_job(
    job: str, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
) -> str:
    deadline = time.monotonic() + timeout
    while (state := job_state(job)) not in until:
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job])
            pytest.fail(f"job {job} still {state} after {timeout} s")
        time.sleep(0.5)
    return state


# --- Ray ---------------------------------------------------------------------------------------


class RayHead:
    """`ray start --head --block` in its own process group, with private ports and temp dir."""

    def __init__(self, num_cpus: int = 2):
        self.tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
        self.port, self.dash = free_port(), free_port()
        cmd = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            f"--port={self.port}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dash}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={self.tmp}",
            "--disable-usage-stats",
        ]
        self.log = open(Path(self.tmp) / "head.log", "w")
        env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **ISOLATED}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dash}"

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {(Path(self.tmp) / 'head.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # the job server answers (with token auth on, unauthenticated calls get 401)
            except OSError:
                time.sleep(1.0)
        raise RuntimeError("the Ray head did not come up in time")

    def stop(self) -> None:
        try:  # the whole process group this head started: gcs, raylet, dashboard, workers
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=3)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
