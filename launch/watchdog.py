"""A stalled or dead rank fails the job in bounded time, naming the rank.

Every collective waits at most `trainer.collective_timeout` seconds (passed to the process group).
Beside training, each rank's heartbeat thread writes (time, step) into the rendezvous store every
few seconds; a rank that is stopped (SIGSTOP), swapped out or dead stops writing. When a
collective times out, the rank that saw it reads every heartbeat and names the ranks whose
heartbeat is oldest: the one that stalled, not the one that waited.
"""

from __future__ import annotations

import threading
import time

import torch.distributed as dist

from moeflow.moe.errors import RunFailed

BEAT_S = 2.0
KEY = "moeflow/heartbeat/{}"


class StalledPeer(RunFailed):
    """A collective waited longer than trainer.collective_timeout."""


class Heartbeat:
    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.step = rank, world, 0
        self.store = _store()
        self._stop = threading.Event()
        self._thread = None
        if self.store is not None and world > 1:
            self._thread = threading.Thread(target=self._run, name="moeflow-heartbeat", daemon=True)
            self._beat()
            self._thread.start()

    def _beat(self) -> None:
        try:
            self.store.set(KEY.format(self.rank), f"{time.time():.3f} {self.step}")
        except Exception:  # noqa: BLE001 - the store went away with the job: nothing to report to
            self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(BEAT_S):
            self._beat()

    def stalled_ranks(self) -> list[tuple[int, float, int]]:
        """(rank, seconds since its last heartbeat, its last step), oldest first, ranks silent for > 3 beats."""
        now, out = time.time(), []
        for r in range(self.world):
            try:
                t, step = self.store.get(KEY.format(r)).decode().split()
            except Exception:  # noqa: BLE001 - never wrote: as stale as can be
                out.append((r, float("inf"), -1))
                continue
            age = now - float(t)
            if age > 3 * BEAT_S:
                out.append((r, age, int(step)))
        return sorted(out, key=lambda x: -x[1])

    def explain(self, err: BaseException, timeout_s: float) -> StalledPeer:
        stalled = [s for s in self.stalled_ranks() if s[0] != self.rank]
        who = (
            ", ".join(f"rank {r} (silent for {age:.0f} s, at step {step})" for r, age, step in stalled[:4])
            if stalled
            else "no rank's heartbeat stopped (all alive but one is slower than the timeout)"
        )
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        return StalledPeer(
            f"rank {self.rank}: a collective waited more than trainer.collective_timeout={timeout_s:g} s ({first}); stalled: {who}. "
            f"Look at that rank's log and host; raise trainer.collective_timeout if steps are legitimately this slow"
        )

    def close(self) -> None:
        self._stop.set()


def _store():
    if not dist.is_initialized():
        return None
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001 - no store (e.g. a backend without one): no heartbeat, timeouts still apply
        return None


def is_timeout(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return isinstance(
        err, (RuntimeError, dist.DistBackendError if hasattr(dist, "DistBackendError") else RuntimeError)
    ) and ("timed out" in text or "timeout" in text)
