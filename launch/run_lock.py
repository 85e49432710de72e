"""One run per run dir: a lock file taken atomically before any work, released on exit.

Two runs in one dir would write the same checkpoint steps and delete each other's temporary
folders. The lock file (`<run dir>/.moeflow-run.lock`) is created with O_EXCL and holds the
holder's host, pid, run id and start time; a thread refreshes its mtime every HEARTBEAT_S. A
lock is stale, and taken over with a warning, when its holder is gone: the same host and a pid
that no longer exists, the same run id (a requeued Slurm job, a Ray Train worker group restarted
on another node: the launcher's own restart of this run), or no refresh for STALE_AFTER_S (a
holder on another host that died).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from moeflow.moe.errors import ConfigError

LOCK_FILE = ".moeflow-run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0

log = logging.getLogger("moeflow.train")


class RunDirInUse(ConfigError):
    """Another live run holds this run dir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


RUN_ID_ENV = "MOEFLOW_RUN_ID"  # set by launchers that restart a run themselves (Ray Train); Slurm's job id otherwise


def _holder() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "run_id": os.environ.get(RUN_ID_ENV) or os.environ.get("SLURM_JOB_ID"),
        "started": time.time(),
    }


def stale_reason(info: dict, age_s: float) -> str | None:
    """Why the lock described by `info` (last refreshed `age_s` ago) belongs to no live run, or None."""
    me = _holder()
    same_host, pid = info.get("host") == me["host"], info.get("pid")
    if same_host and isinstance(pid, int):  # on this host the process itself says whether the holder lives
        return None if _alive(pid) else f"its process {pid} on this host has exited"
    if info.get("run_id") and info.get("run_id") == me["run_id"]:
        return f"it was taken by an earlier start of this same run ({me['run_id']}: a requeue or a restart by its launcher on another host)"
    if age_s > STALE_AFTER_S:
        return f"it has not been refreshed for {age_s:.0f} s"
    return None


def check_unlocked(run_dir: Path) -> None:
    """Refuse, before anything is written there, a run dir that a live run holds (Hydra writes its
    .hydra/ files and train.log into the dir before the run takes the lock)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        info = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except (OSError, ValueError):
        return
    if isinstance(info, dict) and stale_reason(info, age) is None:
        raise RunDirInUse(
            f"run dir {path.parent} is in use by another run (host {info.get('host')}, pid {info.get('pid')}); "
            f"wait for it, or choose another hydra.run.dir (if that run is gone, delete {path})"
        )


class RunLock:
    """Hold `run_dir`'s lock; `release()` (also at interpreter exit) frees it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(50):  # a takeover in progress elsewhere: wait for it (0.2 s a round)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_holder(), f)
            self.held = True
            atexit.register(self.release)
            self._thread = threading.Thread(target=self._refresh, name="moeflow-run-lock", daemon=True)
            self._thread.start()
            return self
        raise RunDirInUse(f"could not take the lock {self.path}; check that no other run uses {self.path.parent}")

    def _take_over_if_stale(self) -> None:
        """Replace a stale lock, one process at a time: the takeover itself is guarded by a second
        file created with O_EXCL (two restarts racing for one stale lock must not both win)."""
        guard = self.path.with_name(LOCK_FILE + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > 60:  # left by a process that died mid-takeover
                    guard.unlink()
            except FileNotFoundError:
                pass
            time.sleep(0.2)
            return  # another process is taking over: look again
        os.close(fd)
        try:
            self._replace_if_stale()
        finally:
            guard.unlink(missing_ok=True)

    def _replace_if_stale(self) -> None:
        try:
            info = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError):  # unreadable or half-written: judged by its age alone
            info, age = {}, (time.time() - self.path.stat().st_mtime) if self.path.exists() else 0.0
        info = info if isinstance(info, dict) else {}
        why = stale_reason(info, age)
        if why is None:
            started = (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
                if isinstance(info.get("started"), (int, float))
                else "?"
            )
            raise RunDirInUse(
                f"run dir {self.path.parent} is in use by another run (host {info.get('host')}, pid {info.get('pid')}, "
                f"started {started}); wait for it, or choose another hydra.run.dir (if that run is gone, delete {self.path})"
            )
        log.warning("taking over the lock of run dir %s: %s", self.path.parent, why)
        self.path.unlink(missing_ok=True)  # under the takeover guard: nobody else replaces it meanwhile

    def _refresh(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self._stop.set()
        try:
            info = json.loads(self.path.read_text())
            if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
