"""Saving and resuming a run through its engine: the one path every moeflow-format checkpoint takes.

An engine that writes moeflow checkpoints (torch, megatron) offers:
- `checkpoint_state(with_optimizer=True)`: the state to save, for torch.distributed.checkpoint:
  {"model": weights by their single-process names, and engine-specific optimizer state};
  sharded tensors (DTensors) where the engine shards them, full ones where it gathers them;
- `schedule_state()`: what the step counter and schedule need (JSON);
- `load_checkpoint_state(state, trainer_state)`: `state` filled from a checkpoint (the same
  structure as `checkpoint_state()`, perhaps without the optimizer), `trainer_state` None for
  a weights-only start;
- `load_full_weights(weights)`: consolidated weights (safetensors: `moeflow upcycle`, conversions).
Everything else (where checkpoints are, atomic commits, compatibility, RNG streams, steps,
async saves, pruning) is here.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from omegaconf import OmegaConf

from moeflow.moe.errors import CheckpointError
from moeflow.parallel import checkpoint as sharded

from . import checkpoint as ckpt

log = logging.getLogger("moeflow.train")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointWriter:
    """Writes a run's checkpoints (every rank calls `save`); `asynchronous` saves in the background:
    the state is staged to CPU memory, training goes on, and the checkpoint is committed (renamed
    into place, pruned) when its write completes, at the latest before the next save or at `close`."""

    def __init__(self, engine, engine_name: str, asynchronous: bool = False):
        self.engine, self.engine_name, self.asynchronous = engine, engine_name, asynchronous
        self.pending = None  # (future, tmp dir, step, trainer_state, meta) of an async save in flight
        self.group = sharded.async_process_group() if asynchronous else None

    def save(self, step: int) -> Path | None:
        """Checkpoint `step`; its dir once committed (on rank 0; None elsewhere or while in flight)."""
        done = self.finish()
        e = self.engine
        tmp = ckpt.temp_dir(e.run_dir, step)
        try:
            if _rank() == 0:
                tmp.mkdir(parents=True, exist_ok=True)
            _barrier()
            ckpt.write_rng(tmp, _rank())
            trainer_state = {"step": step, "engine": self.engine_name, "global_batch": global_batch(e), **e.schedule_state()}
            meta = {"model": e.model_cfg.to_dict(), "config": OmegaConf.to_container(e.cfg, resolve=True), "engine": self.engine_name,
                    "step": step, "format": "dcp"}
            future = sharded.save_sharded(tmp, e.checkpoint_state(with_optimizer=True), process_group=self.group, asynchronous=self.asynchronous)
            if future is None:
                _barrier()  # every rank's shards are on disk
                return self._commit(tmp, step, trainer_state, meta) or done
        except (Exception, CheckpointException) as err:  # a full disk, a read-only dir: one line, no temp dir left behind
            raise save_failed(tmp, step, err) from None
        self.pending = (future, tmp, step, trainer_state, meta)
        return done

    def finish(self) -> Path | None:
        """Wait for an async save in flight and commit it; its dir (rank 0)."""
        if self.pending is None:
            return None
        future, tmp, step, trainer_state, meta = self.pending
        self.pending = None
        try:
            future.result()  # raises if the write failed: the temp dir is never committed
            return self._commit(tmp, step, trainer_state, meta)
        except (Exception, CheckpointException) as err:
            raise save_failed(tmp, step, err) from None

    def _commit(self, tmp: Path, step: int, trainer_state: dict, meta: dict) -> Path | None:
        if _rank() != 0:
            return None
        path = ckpt.commit(tmp, meta, trainer_state, self.engine.cfg.trainer.keep_checkpoints)
        log.info("saved checkpoint %s", path)
        return path

    def close(self) -> None:
        self.finish()


def _causes(err: BaseException, depth: int = 4) -> list[BaseException]:
    """err, what caused it, and the per-rank exceptions a DCP CheckpointException wraps (its
    message names only the ranks: the OSError that says "disk full" is inside `failures`)."""
    out = [err]
    if depth == 0:
        return out
    inner = [err.__cause__, err.__context__]
    for failure in (getattr(err, "failures", None) or {}).values():
        inner.append(failure[0] if isinstance(failure, tuple) else failure)
    for e in inner:
        if isinstance(e, BaseException) and e not in out:
            out += [c for c in _causes(e, depth - 1) if c not in out]
    return out


def save_failed(tmp: Path, step: int, err: BaseException) -> CheckpointError:
    """The one-line error for a checkpoint that could not be written; its temp dir is removed."""
    import errno
    import shutil

    found = _causes(err)
    text = " ".join(str(e) for e in found)
    codes = {getattr(e, "errno", None) for e in found}
    if errno.ENOSPC in codes or errno.EFBIG in codes or "No space left" in text or "File too large" in text:
        why, fix = "the disk is full (or a file-size limit was hit)", "free space, or point hydra.run.dir at a disk with room, and resume"
    elif errno.EROFS in codes or errno.EACCES in codes or "Read-only file system" in text or "Permission denied" in text:
        why, fix = "the run dir is not writable (read-only or no permission)", "make it writable, or choose another hydra.run.dir, and resume"
    else:
        why, fix = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}", "resume from the last checkpoint"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return CheckpointError(f"could not write checkpoint step {step} into {tmp.parent}: {why}; {fix}")


def global_batch(engine) -> int:
    """Sequences per optimizer step over all data-parallel ranks."""
    return int(engine.cfg.data.batch_size) * int(engine.cfg.trainer.grad_accum) * int(engine.data_parallel_rank[1])


def _say_if_global_batch_changed(found: Path, trainer_state: dict, engine) -> None:
    saved, now = trainer_state.get("global_batch"), global_batch(engine)
    if saved is None or saved == now:
        return
    per = int(engine.cfg.trainer.grad_accum) * int(engine.data_parallel_rank[1])
    fix = f"data.batch_size={saved // per}" if saved % per == 0 else f"data.batch_size and trainer.grad_accum with a product of {saved} / {engine.data_parallel_rank[1]} ranks"
    log.warning("checkpoint %s trained with a global batch of %d sequences per step; this run's is %d (%d data-parallel ranks x data.batch_size=%s x "
                "trainer.grad_accum=%s): set %s to keep it", found, saved, now, engine.data_parallel_rank[1], engine.cfg.data.batch_size, engine.cfg.trainer.grad_accum, fix)


def checkpoint_to_resume(resume, run_dir: Path) -> Path | None:
    """The checkpoint `resume` names (null: none; auto: this run's latest, if any; else a run or checkpoint dir)."""
    if resume is None:
        return None
    where = Path(run_dir) if resume == "auto" else Path(str(resume)).expanduser()
    found = ckpt.find_checkpoint(where)
    deepspeed_like = (where / ckpt.CKPT_DIR / "deepspeed").is_dir() or any(where.glob("mp_rank_*_model_states.pt")) or any(where.glob("*/mp_rank_*_model_states.pt"))
    if found is None and deepspeed_like:
        raise CheckpointError(f"resume={resume}: {where} holds DeepSpeed checkpoints; resume them with engine=deepspeed, or convert one "
                              f"for this engine: moeflow convert deepspeed-to-moeflow {where} OUT --trust-checkpoint")
    if found is None and resume != "auto":
        raise CheckpointError(f"resume={resume}: no checkpoint found there; pass a run dir with checkpoints/ or a checkpoint dir")
    if found is None:
        log.info("resume=auto: no checkpoint in %s, starting fresh", run_dir)
    return found


def resume_run(engine, engine_name: str) -> int:
    """Load the checkpoint `resume` asks for into the engine; the step to start at (0 for a fresh run)."""
    if _rank() == 0:
        for stale in ckpt.remove_temp_dirs(engine.run_dir):
            log.warning("removed %s, left by a save that did not complete", stale)
    found = checkpoint_to_resume(engine.cfg.resume, engine.run_dir)
    return 0 if found is None else load_into(engine, found, engine_name)


def load_into(engine, found: Path, engine_name: str) -> int:
    """Checkpoint `found` into the engine: weights, and unless weights-only, optimizer, schedule and
    RNG streams; the step it was written at (0 for weights-only)."""
    meta = ckpt.read_meta(found)
    ckpt.check_compatible(found, meta.get("model", {}), engine.model_cfg, ckpt.stored_weight_shapes(found))
    trainer_state = None if meta.get("weights_only") else ckpt.load_trainer_state(found)
    if ckpt.is_sharded(found):
        saved_by = (trainer_state or {}).get("engine", meta.get("engine"))
        same_optimizer = trainer_state is not None and saved_by == engine_name  # optimizer state is only ever the same engine's
        if trainer_state is not None and not same_optimizer:
            log.warning("checkpoint %s was written by engine=%s: its weights and schedule carry over, AdamW moments start from zero", found, saved_by)
        state = engine.checkpoint_state(with_optimizer=same_optimizer)
        sharded.load_sharded(found, state)
    else:
        state = None
        engine.load_full_weights(ckpt.load_model_state(found))
    engine.load_checkpoint_state(state, trainer_state)
    if trainer_state is None:
        log.info("initialised from weights-only checkpoint %s; fresh optimizer and schedule at step 0", found)
        return 0
    _say_if_global_batch_changed(found, trainer_state, engine)
    rng = ckpt.read_rng(found, _rank()) or trainer_state.get("rng")
    if rng is not None:
        ckpt.set_rng_state(rng)
    log.info("resumed from %s at step %d", found, trainer_state["step"])
    return int(trainer_state["step"])
