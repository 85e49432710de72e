"""The engine contract: everything the training loop (`launch/train.py`) may use of an engine, and nothing else.

`Engine` is the contract and the one place its defaults live; every engine subclasses it
(engines that write moeflow checkpoints through `launch/resume.py` subclass
`MoeflowCheckpointEngine`, which fills in saving, async-save polling and rollback). The loop
touches an engine only through the members listed in `MEMBERS`, checked statically by
tests/integration/test_engine_contract.py, which also runs every engine two steps through it.

The step is split the same way in every engine: `forward_backward` runs forward and backward
of one micro-batch (gradients accumulate), `optimizer_step` syncs what is left, clips, steps
optimizer and schedule and clears the gradients. Neither reads a device value on the host:
the gradient norm comes back as a tensor, and the loop reads it only when it logs or checks.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any, ClassVar

import torch

from moeflow.moe.errors import ConfigError
from moeflow.parallel.distributed import DistEnv


class Engine(abc.ABC):
    """Who owns the step. Construction (`Engine(cfg, model_cfg, trainer_cfg, env, device, run_dir)`,
    after `start`) builds model, optimizer and schedule and resumes if `cfg.resume` asks; then it sets
    the attributes below."""

    name: ClassVar[str]  # the engine's config name (engine.name), also written into its checkpoints

    # -- attributes every engine sets in its constructor ------------------------------------
    model: torch.nn.Module  # the moeflow view of the model: `moe_layers()` (gates, routing stats), `aux_loss()`
    eval_model: Callable[
        [torch.Tensor], torch.Tensor
    ]  # tokens -> logits for evaluation (DeepSpeed: its engine, which gathers ZeRO-3 shards)
    autocast: Callable[[], ContextManager]  # the autocast context evaluation runs under
    start_step: int  # the step a resume starts at (0: a fresh run)
    data_parallel_rank: tuple[
        int, int
    ]  # (rank, size) of this rank's batch shard: the ranks of one TP group share a batch
    data_parallel_group: Any  # the process group routing statistics and the loss are averaged over (None: the world)
    last_step_skipped: bool = False  # whether the last optimizer_step skipped the update (on_nonfinite=skip_step)

    @staticmethod
    @abc.abstractmethod
    def start(cfg, trainer_cfg) -> tuple[DistEnv, torch.device]:
        """Join the process group (and the framework's own groups); this rank's (DistEnv, device)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the run log: the model, its size, device, precision, layout."""

    @abc.abstractmethod
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one micro-batch (`last`: the step's last one, where gradients are
        reduced); (loss, aux loss), 0-dim device tensors. Never steps the optimizer."""

    @abc.abstractmethod
    def optimizer_step(self) -> torch.Tensor | None:
        """The optimizer step after the step's micro-batches: gradient sync, clipping, optimizer,
        schedule, gradients cleared. The pre-clip global gradient norm as a 0-dim tensor (no host
        read: the loop reads it when it logs), or None where the engine computes none."""

    def lr(self) -> float:
        """The learning rate of the step just taken (every engine keeps a torch LR schedule in `sched`)."""
        return self.sched.get_last_lr()[0]

    @abc.abstractmethod
    def save(self, step: int) -> Path | None:
        """Checkpoint after `step` steps (every rank calls it; collective); the checkpoint dir once
        committed, on the rank that reports it (None elsewhere, and while an async save is in flight)."""

    def poll_save(self) -> Path | None:
        """After every step: commit an async save whose write has finished (never waits); its dir or None."""
        return None

    def finish_save(self) -> Path | None:
        """Wait for an async save in flight and commit it (the loop calls it when the run fails)."""
        return None

    def rollback(self, checkpoint: Path) -> int:
        """trainer.on_nonfinite=rollback: reload `checkpoint` (weights, optimizer, schedule, gate state,
        RNG streams) into the engine; the step it was written at."""
        raise ConfigError(
            f"trainer.on_nonfinite=rollback needs an engine that writes moeflow checkpoints (torch, megatron), "
            f"not engine={self.name}; use trainer.on_nonfinite=stop"
        )

    def extra_result(self) -> dict:
        """Engine-specific entries for the run's result dict."""
        return {}

    def stage_report(self) -> str | None:
        """A line for the log at each log step, or None: under pipeline parallelism each stage's time and
        memory. Collective where it reports: every rank calls it."""
        return None

    def close(self) -> None:
        """At the end of the run: commit a save in flight, release the framework's state."""


class MoeflowCheckpointEngine(Engine):
    """An engine that writes moeflow checkpoints through `launch/resume.py` (torch, megatron): saving,
    async-save polling, rollback and closing go through its `CheckpointWriter` (`self.writer`, made by
    `start_checkpoints`). It offers resume.py the four methods below."""

    writer: Any  # resume.CheckpointWriter

    def start_checkpoints(self, trainer_cfg) -> int:
        """The checkpoint writer, and the resume `cfg.resume` asks for; the step to start at."""
        from .. import resume

        self.writer = resume.CheckpointWriter(self, self.name, asynchronous=bool(trainer_cfg.async_checkpoint))
        return resume.resume_run(self, self.name)

    @abc.abstractmethod
    def checkpoint_state(self, with_optimizer: bool = True) -> dict:
        """The state to save or to fill from a checkpoint (torch.distributed.checkpoint)."""

    @abc.abstractmethod
    def schedule_state(self) -> dict:
        """What the step counter and schedule need (JSON)."""

    @abc.abstractmethod
    def load_checkpoint_state(self, state: dict | None, trainer_state: dict | None) -> None:
        """Apply a filled `checkpoint_state()` (None: weights came through `load_full_weights`) and the trainer state."""

    @abc.abstractmethod
    def load_full_weights(self, weights: dict) -> None:
        """Consolidated single-process weights into this rank's parameters."""

    def save(self, step: int) -> Path | None:
        return self.writer.save(step)

    def poll_save(self) -> Path | None:
        return self.writer.poll()

    def finish_save(self) -> Path | None:
        return self.writer.finish()

    def rollback(self, checkpoint: Path) -> int:
        from .. import resume

        return resume.load_into(self, checkpoint, self.name)

    def close(self) -> None:
        self.writer.close()


def members() -> frozenset[str]:
    """The names the training loop may use of an engine (the engine class's `start` included)."""
    names = {n for n in vars(Engine) if not n.startswith("_")} | set(Engine.__annotations__)
    return frozenset(names)


MEMBERS = members()
