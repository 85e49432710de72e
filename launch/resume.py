"""Saving and resuming a run through its engine: the one path every moeflow-format checkpoint takes.

An engine that writes moeflow checkpoints (torch, megatron) offers two methods:
- `checkpoint_state(step)` -> (weights in moeflow's single-process layout, optimizer and scheduler
  state), a collective (expert and tensor-parallel shards are gathered); None on ranks that do
  not write;
- `load_checkpoint_state(weights, trainer_state)` with the checkpoint's weights and its trainer
  state (None for a weights-only checkpoint: fresh optimizer and schedule at step 0).
Everything else (where the checkpoint is, compatibility, RNG, step, meta.json, pruning) is here.
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from moeflow.moe.errors import CheckpointError

from . import checkpoint as ckpt

log = logging.getLogger("moeflow.train")


def save_run(engine, step: int, engine_name: str) -> Path | None:
    """Write checkpoint `step` of the run (collective: call on every rank); its dir on the writing rank."""
    state = engine.checkpoint_state(step)  # gathers shards: every rank takes part
    if not engine.env.is_main:
        return None
    weights, trainer_state = state
    trainer_state = {**trainer_state, "rng": ckpt.rng_state(), "step": step, "engine": engine_name}
    meta = {"model": engine.model_cfg.to_dict(), "config": OmegaConf.to_container(engine.cfg, resolve=True), "engine": engine_name}
    path = ckpt.save_checkpoint(engine.run_dir, step, weights, trainer_state, meta, engine.cfg.trainer.keep_checkpoints)
    log.info("saved checkpoint %s", path)
    return path


def checkpoint_to_resume(resume, run_dir: Path) -> Path | None:
    """The checkpoint `resume` names (null: none; auto: this run's latest, if any; else a run or checkpoint dir)."""
    if resume is None:
        return None
    where = Path(run_dir) if resume == "auto" else Path(str(resume)).expanduser()
    found = ckpt.find_checkpoint(where)
    if found is None and resume != "auto":
        raise CheckpointError(f"resume={resume}: no checkpoint found there; pass a run dir with checkpoints/ or a checkpoint dir")
    if found is None:
        log.info("resume=auto: no checkpoint in %s, starting fresh", run_dir)
    return found


def resume_run(engine) -> int:
    """Load the checkpoint `resume` asks for into the engine; the step to start at (0 for a fresh run)."""
    found = checkpoint_to_resume(engine.cfg.resume, engine.run_dir)
    if found is None:
        return 0
    meta = ckpt.read_meta(found)
    weights = ckpt.load_model_state(found)
    ckpt.check_compatible(found, meta.get("model", {}), engine.model_cfg, weights)
    if meta.get("weights_only"):  # e.g. written by `moeflow upcycle`: weights to start from, no optimizer state
        engine.load_checkpoint_state(weights, None)
        log.info("initialised from weights-only checkpoint %s; fresh optimizer and schedule at step 0", found)
        return 0
    trainer_state = ckpt.load_trainer_state(found)
    engine.load_checkpoint_state(weights, trainer_state)
    ckpt.set_rng_state(trainer_state["rng"])
    log.info("resumed from %s at step %d", found, trainer_state["step"])
    return int(trainer_state["step"])
