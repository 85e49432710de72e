"""moeflow ray on a real local Ray cluster (one `ray start --head` shared by this module's tests)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers.launch import ISOLATED, QUICK, RayHead, free_port, moeflow, val_losses
from helpers.timeouts import limit

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.xdist_group("ray_cluster")]


@pytest.fixture(scope="module")
def cluster():
    head = RayHead(num_cpus=2)
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()


def test_unreachable_address_names_the_fix(tmp_path):
    done = moeflow(
        "ray", "launch", f"launcher.address=127.0.0.1:{free_port()}", f"hydra.run.dir={tmp_path}", timeout=limit(60)
    )
    assert done.returncode == 2
    assert "cannot reach a Ray cluster at 127.0.0.1:" in done.stderr and "ray start --head" in done.stderr
    done = moeflow("ray", "submit", "--address", f"http://127.0.0.1:{free_port()}", timeout=limit(60))
    assert done.returncode == 2 and "cannot reach a Ray cluster" in done.stderr


def test_more_workers_than_the_cluster_has(cluster, tmp_path):
    done = moeflow(
        "ray",
        "launch",
        f"launcher.address={cluster.address}",
        "launcher.num_workers=5",
        f"hydra.run.dir={tmp_path}",
        timeout=limit(120),
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "launcher.num_workers=5 needs 5 CPU but the Ray cluster has 2: lower launcher.num_workers" in done.stderr


def test_two_workers_train_and_a_killed_worker_resumes_from_checkpoint(cluster, tmp_path):
    """Ray Train runs 2 gloo workers; SIGKILL one mid-run; FailureConfig restarts the group from the last checkpoint."""
    run = tmp_path / "run"
    overrides = [*QUICK, "trainer.steps=200", "trainer.eval_every=100", "trainer.ckpt_every=20", "trainer.log_every=1"]
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", **ISOLATED}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moeflow.launch.cli",
            "ray",
            "launch",
            *overrides,
            f"launcher.address={cluster.address}",
            "launcher.num_workers=2",
            "launcher.max_failures=1",
            f"hydra.run.dir={run}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        pid_file, first_ckpt = run / "ray_workers" / "rank1.pid", run / "checkpoints" / "step_00000020"
        deadline = time.monotonic() + limit(180)
        while not (first_ckpt.exists() and pid_file.exists()):
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stdout.read()[-3000:] if proc.poll() is not None else "no checkpoint in time"
            )
            time.sleep(0.2)
        victim = int(pid_file.read_text())
        os.kill(victim, signal.SIGKILL)  # a worker dies mid-run
        out, _ = proc.communicate(timeout=limit(300))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "rank 0/2 up" in out and "rank 1/2 up" in out
    assert "Ray Train restart: resuming from" in out
    resumed = [int(s) for s in __import__("re").findall(r"resumed from \S+ at step (\d+)", out)]
    assert resumed and resumed[0] >= 20 and resumed[0] % 20 == 0, out[-3000:]
    assert int(pid_file.read_text()) != victim, "rank 1 must run in a new worker process after the restart"
    assert (run / "checkpoints" / "step_00000200").is_dir()
    assert "'step': 200" in out
    losses = val_losses(out)
    assert losses and losses[-1] < losses[0], losses


def test_submit_as_a_ray_job(cluster, tmp_path):
    run = tmp_path / "run"
    done = moeflow(
        "ray",
        "submit",
        "--address",
        cluster.dashboard,
        *QUICK,
        "launcher.num_workers=2",
        f"hydra.run.dir={run}",
        timeout=limit(300),
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "submitted Ray job" in out and "SUCCEEDED" in out
    assert "rank 0/2 up" in out and "rank 1/2 up" in out
    losses = val_losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert (run / "checkpoints" / "step_00000010").is_dir()


def test_on_prem_cluster_yaml_passes_rays_own_validation():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    from helpers.launch import ROOT

    config = yaml.safe_load((ROOT / "launch" / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))  # the same check `ray up` runs first
    assert config["provider"]["type"] == "local" and config["provider"]["worker_ips"]
