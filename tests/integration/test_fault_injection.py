"""Fault injection on the real `moeflow train`: kill -9 during saves, a full disk, a run dir made read-only.

After each fault: the newest complete checkpoint resumes bit-identically to an uninterrupted run,
no partial checkpoint is ever picked, and no temporary files remain after the next run.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.config import TINY
from helpers.timeouts import limit
from moeflow.launch import checkpoint as ckpt
from moeflow.parallel.checkpoint import read_full_tensors, verify_files

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("fault_injection")]

STEPS = 8
COMMON = [
    *TINY,
    f"trainer.steps={STEPS}",
    "trainer.eval_every=0",
    "trainer.ckpt_every=1",
    "trainer.keep_checkpoints=2",
    "data.max_bytes=200000",
]


def cli(run_dir: Path, *extra: str, preexec=None, wait=True, timeout=None):
    cmd = [sys.executable, "-m", "moeflow.launch.cli", "train", *COMMON, *extra, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=run_dir.parent,
            preexec_fn=preexec,
        )
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout or limit(180),
        env=env,
        cwd=run_dir.parent,
        preexec_fn=preexec,
    )


def final_weights(run_dir: Path) -> dict:
    return read_full_tensors(ckpt.final_dir(run_dir, STEPS))


def assert_resumes_like(reference: dict, run_dir: Path) -> None:
    """Resume whatever checkpoint is there to the end; its final state equals the uninterrupted run's, bit for bit."""
    done = cli(run_dir, "resume=auto")
    assert done.returncode == 0, done.stderr[-2000:]
    got = final_weights(run_dir)
    assert got.keys() == reference.keys()
    bad = [k for k in reference if not torch.equal(got[k], reference[k])]
    assert not bad, bad[:3]
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "a temp dir survived the next run"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("ref") / "run"
    done = cli(run)
    assert done.returncode == 0, done.stderr[-2000:]
    return final_weights(run)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_9_at_random_points_of_a_save_loop(tmp_path, reference, mode):
    """Every resume after a kill -9 anywhere in a loop of saves (sync, or async in the background)
    ends bit-identical to the uninterrupted run."""
    rng = random.Random(1234 if mode == "sync" else 4321)
    trials = 3  # one random kill point in each third of the 1.5 s after the first save begins
    for trial in range(trials):
        run = tmp_path / f"t{trial}"
        run.mkdir()
        proc = cli(run, f"trainer.async_checkpoint={mode == 'async'}", wait=False)
        deadline = time.monotonic() + limit(120)
        while not (run / "checkpoints").is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the first save has begun
        time.sleep(rng.uniform(trial, trial + 1) * 1.5 / trials)  # somewhere in the steps and saves that follow
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for c in ckpt.list_checkpoints(run / "checkpoints"):  # whatever is listed as complete is complete
            assert ckpt.is_complete(c) and (c / "trainer_state.json").is_file()
            verify_files(c)  # every shard matches the digest its index records
        assert_resumes_like(reference, run)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_last_checkpoint(tmp_path, reference, mode):
    run = tmp_path / "run"
    run.mkdir()
    first = cli(run, "trainer.steps=2")  # steps 1 and 2 saved normally
    assert first.returncode == 0, first.stderr[-2000:]

    def small_disk():  # every file this process writes stops at 64 KiB (EFBIG, as a full disk gives ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    full = cli(run, "resume=auto", "trainer.steps=4", f"trainer.async_checkpoint={mode == 'async'}", preexec=small_disk)
    assert full.returncode == 2, full.stderr[-2000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]  # one line, not a background writer's tracebacks
    err = full.stderr.strip().splitlines()[-1]
    assert err.startswith("moeflow train: error: could not write checkpoint step 3") and "disk is full" in err, err
    assert not list((run / "checkpoints").glob(".tmp-*")), "the failed save left its temp dir"
    assert ckpt.find_checkpoint(run).name == "step_00000002"
    assert_resumes_like(reference, run)


def _can_mount() -> bool:
    probe = Path("/tmp") / f"moeflow-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    ok = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True).returncode
        == 0
    )
    if ok:
        subprocess.run(["umount", str(probe)], capture_output=True)
    probe.rmdir()
    return ok


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root to mount a tmpfs it can remount read-only"
)
def test_a_run_dir_made_read_only_mid_run(tmp_path, reference):
    if not _can_mount():
        pytest.skip("this machine does not allow mounting a tmpfs (no CAP_SYS_ADMIN)")
    # the checkpoints dir is its own tmpfs: between saves nothing in it is open for writing, so it can be
    # remounted read-only while the run goes on (the rest of the run dir stays writable)
    run = tmp_path / "run"
    mnt = run / "checkpoints"
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mnt)], check=True)
    try:
        for attempt in range(5):  # the run is short: if it finished before the remount, try again
            for p in mnt.iterdir():
                shutil.rmtree(p)
            proc = cli(run, wait=False)
            deadline = time.monotonic() + limit(120)
            while not ckpt.list_checkpoints(mnt) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            while (
                subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True).returncode != 0
                and proc.poll() is None
            ):
                time.sleep(0.01)  # a save in progress holds a file open: the next gap between saves
            _, stderr = proc.communicate(timeout=limit(120))
            subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
            if proc.returncode != 0:
                break
        assert proc.returncode == 2, stderr[-2000:]
        err = stderr.strip().splitlines()[-1]
        assert "could not write checkpoint" in err and "not writable" in err, err
        assert ckpt.find_checkpoint(run) is not None  # what was complete before stays complete
        assert_resumes_like(reference, run)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_inside_a_dcp_failure_is_named():
    """DCP reports a failed write as CheckpointException("ranks: [0]"); the OSError that says why
    is in its `failures` (how the 64-KiB file limit above surfaces when DCP's writer hits it)."""
    import errno
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    from moeflow.launch.resume import save_failed

    for code, words in ((errno.EFBIG, "disk is full"), (errno.ENOSPC, "disk is full"), (errno.EROFS, "not writable")):
        err = CheckpointException(
            "CheckpointException ranks:dict_keys([0])",
            {0: (OSError(code, os.strerror(code)), traceback.StackSummary())},
        )
        assert words in str(save_failed(Path("/nonexistent/.tmp-step"), 3, err))
