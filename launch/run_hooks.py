"""What a launcher needs from inside the training loop, in one object the trainer calls.

- Preemption (Slurm): SIGUSR1/SIGTERM set a flag; at the next step boundary all ranks agree
  (one all-reduce), save a checkpoint, and rank 0 runs `scontrol requeue` so the job restarts
  with `resume=auto` in the same run dir. Armed only when the launcher exports MOEFLOW_PREEMPTIBLE=1.
- Otherwise, in a one-process run, Ctrl-C (SIGINT) and SIGTERM stop the run the same way at the
  next step boundary, with a checkpoint and one line saying how to continue; a second Ctrl-C stops
  at once.
- Ray Train: each checkpoint is reported to Ray Train (`ray.train.report`), so FailureConfig
  restarts resume from it. Armed by `set_checkpoint_reporter` in the Ray worker.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("moeflow.launch")

# (step, metrics, checkpoint dir or None) -> None; set by the Ray Train worker.
_reporter: Callable[[int, dict, Path | None], None] | None = None


def set_checkpoint_reporter(fn: Callable[[int, dict, Path | None], None] | None) -> None:
    global _reporter
    _reporter = fn


class RunHooks:
    def __init__(self, env, run_dir: Path, device: torch.device):
        self.env, self.run_dir, self.device = env, Path(run_dir), device
        self.signal_name: str | None = None
        self.armed = os.environ.get("MOEFLOW_PREEMPTIBLE") == "1"
        # one process outside Slurm (under torchrun, SIGTERM is how the launcher tears ranks down: it must stay fatal)
        self.interruptible = (
            not self.armed and env.world_size == 1 and threading.current_thread() is threading.main_thread()
        )
        self._old = {}
        if self.armed:
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._on_signal)
        elif self.interruptible:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._on_interrupt)
        if env.world_size > 1 or self.armed:  # every rank, whatever its log level: launcher logs show who ran
            print(
                f"moeflow: rank {env.rank}/{env.world_size} up on {socket.gethostname()} (pid {os.getpid()})",
                file=sys.stderr,
                flush=True,
            )

    def _on_signal(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def _on_interrupt(self, signum, _frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.signal_name is None and self.env.is_main:
            print(
                f"moeflow: {signal.Signals(signum).name}: stopping after this step with a checkpoint (Ctrl-C again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
        self.signal_name = signal.Signals(signum).name

    def stop_requested(self) -> bool:
        """True on every rank once any rank got a preemption or stop signal (checked at step boundaries)."""
        if not (self.armed or self.interruptible):
            return False
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_checkpoint(self, step: int, metrics: dict, path: Path | None) -> None:
        """After every rank saved checkpoint `path` (the engine's dir; None on ranks that wrote none)."""
        if _reporter is not None:
            _reporter(step, metrics, path if self.env.is_main else None)

    def on_preempted(self, step: int) -> None:
        """Called after the preemption checkpoint: requeue the Slurm job, then the loop ends
        (outside Slurm the trainer then stops with one line: `Interrupted`)."""
        if dist.is_initialized():
            dist.barrier()
        if not self.armed:
            return
        job = (
            os.environ.get("SLURM_ARRAY_JOB_ID")
            and f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
        )
        job = job or os.environ.get("SLURM_JOB_ID")
        if self.env.is_main:
            if job and shutil.which("scontrol"):
                done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                outcome = "requeued" if done.returncode == 0 else f"requeue failed: {done.stderr.strip()}"
                log.warning("%s at step %d: checkpoint saved, job %s %s", self.signal_name, step, job, outcome)
            else:
                log.warning(
                    "%s at step %d: checkpoint saved; restart with resume=auto to continue", self.signal_name, step
                )

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
