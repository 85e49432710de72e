"""What a run does when its loss or gradient norm stops being a number: `trainer.on_nonfinite`.

- `stop` (default): fail the run (exit code 1) naming the step and the last good checkpoint;
- `skip_step`: skip the optimizer step whose gradient norm is not finite (the engine checks it
  before every step: one host read per step), and stop after `MAX_SKIPS_IN_A_ROW` in a row;
- `rollback`: reload the last good checkpoint and go on from there with other batches than
  the ones that led to the divergence (`attempt` shifts the data keys), at most `MAX_ROLLBACKS`
  times; nothing is lowered behind the user's back, and each rollback is logged.

The loss and norm are checked where the loop reads them anyway, at log points, and before every
checkpoint, which is never written from a non-finite state (so pruning never deletes the last
good one for a bad one).
"""

from __future__ import annotations

import logging
import math

from moeflow.moe.errors import ConfigError, RunFailed

log = logging.getLogger("moeflow.train")

POLICIES = ("stop", "skip_step", "rollback")
MAX_ROLLBACKS = 3
MAX_SKIPS_IN_A_ROW = 10


class Diverged(RunFailed):
    """The run's loss or gradient norm became inf or NaN."""


def check_policy(policy: str, engine: str) -> None:
    if policy not in POLICIES:
        raise ConfigError(f"trainer.on_nonfinite={policy!r} is unknown; choose one of {', '.join(POLICIES)}")
    if policy != "stop" and engine == "deepspeed":
        raise ConfigError(
            f"trainer.on_nonfinite={policy}: engine=deepspeed owns its optimizer step and its checkpoints; use trainer.on_nonfinite=stop"
        )
    if policy == "skip_step" and engine == "megatron":
        raise ConfigError(
            "trainer.on_nonfinite=skip_step is engine=torch's; with engine=megatron use trainer.on_nonfinite=stop or rollback"
        )


def finite(*values) -> bool:
    return all(v is None or math.isfinite(float(v)) for v in values)


class DivergenceGuard:
    def __init__(self, policy: str):
        self.policy, self.rollbacks = policy, 0

    def on_nonfinite(self, step: int, loss: float, grad_norm, last_good) -> None:
        """At a check that found a non-finite value after `step` steps: raise `Diverged` (stop), or
        return to let the caller roll back to `last_good` (rollback)."""
        what = f"loss {loss}" + (f", grad norm {grad_norm}" if grad_norm is not None else "")
        where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written before it"
        if self.policy != "rollback" or last_good is None or self.rollbacks >= MAX_ROLLBACKS:
            tried = f" after {self.rollbacks} rollbacks" if self.rollbacks else ""
            raise Diverged(
                f"training diverged at step {step} ({what}){tried}; {where}. Lower optim.lr or raise optim.warmup_steps "
                f"and resume from it, or set trainer.on_nonfinite=rollback"
            )
        self.rollbacks += 1
        log.warning(
            "step %d: %s; rollback %d of %d: reloading %s and going on with other batches",
            step,
            what,
            self.rollbacks,
            MAX_ROLLBACKS,
            last_good,
        )
