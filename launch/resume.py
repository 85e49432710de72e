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
import shutil
from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.checkpoint.api import CheckpointException

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
    """Writes a run's checkpoints (every rank calls `save`). The manifest (meta.json,
    trainer_state.json, RNG streams) is written first and the shards' index.json last, so a
    folder is complete exactly when its contents say so. `asynchronous` saves in the background:
    the state is staged to CPU memory and training goes on; `poll()` (every step) commits the
    save as soon as its write has finished, and `close()` waits for it."""

    def __init__(self, engine, engine_name: str, asynchronous: bool = False):
        self.engine, self.engine_name, self.asynchronous = engine, engine_name, asynchronous
        self.pending = None  # (future, tmp dir, step) of an async save in flight
        timeout = float(getattr(engine.cfg.trainer, "collective_timeout", 600.0))
        self.group = sharded.async_process_group(timeout) if asynchronous else None

    def save(self, step: int) -> Path | None:
        """Checkpoint `step`; its dir once committed (on rank 0; None elsewhere or while in flight)."""
        done = self.finish()  # one save in flight at a time
        e = self.engine
        tmp = ckpt.temp_dir(e.run_dir, step)
        try:
            if _rank() == 0:
                if tmp.exists():  # left by this run's own earlier attempt at this step (a rollback): never complete
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
                trainer_state = {
                    "step": step,
                    "engine": self.engine_name,
                    "global_batch": global_batch(e),
                    **e.schedule_state(),
                }
                meta = {
                    "model": e.model_cfg.to_dict(),
                    "config": OmegaConf.to_container(e.cfg, resolve=True),
                    "engine": self.engine_name,
                    "step": step,
                    "format": "sharded-safetensors",
                    "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                }
                ckpt.write_manifest(tmp, meta, trainer_state)
            _barrier()
            ckpt.write_rng(tmp, _rank())
            future = sharded.save_sharded(
                tmp, e.checkpoint_state(with_optimizer=True), process_group=self.group, asynchronous=self.asynchronous
            )
            if future is None:
                _barrier()  # every rank's shards and RNG file are on disk, the index written
                return self._commit(tmp) or done
        except (
            Exception,
            CheckpointException,
        ) as err:  # a full disk, a read-only dir: one line, no temp dir left behind
            raise save_failed(tmp, step, err) from None
        self.pending = (future, tmp, step)
        return done

    def poll(self) -> Path | None:
        """Commit an async save whose write has finished (no wait); its dir (rank 0)."""
        if self.pending is not None and self.pending[0].done():
            return self.finish()
        return None

    def finish(self) -> Path | None:
        """Wait for an async save in flight and commit it; its dir (rank 0)."""
        if self.pending is None:
            return None
        future, tmp, step = self.pending
        self.pending = None
        try:
            future.result()  # raises if the write failed: the temp dir is never committed
            return self._commit(tmp)
        except (Exception, CheckpointException) as err:
            raise save_failed(tmp, step, err) from None

    def _commit(self, tmp: Path) -> Path | None:
        if _rank() != 0:
            return None
        path = ckpt.promote(tmp, self.engine.cfg.trainer.keep_checkpoints)
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


def save_failed(tmp: Path, step: int, err: BaseException) -> Exception:
    """The one-line error for a checkpoint that could not be written; its temp dir is removed. A
    collective that timed out during the save comes back as a timeout, for the training loop to
    name the stalled rank."""
    import errno

    from .watchdog import is_timeout

    found = _causes(err)
    timed_out = next((e for e in found if is_timeout(e)), None)
    if timed_out is not None:
        return RuntimeError(
            f"timed out while writing checkpoint step {step}: {str(timed_out).strip().splitlines()[0][:200]}"
        )
    text = " ".join(str(e) for e in found)
    codes = {getattr(e, "errno", None) for e in found}
    if errno.ENOSPC in codes or errno.EFBIG in codes or "No space left" in text or "File too large" in text:
        why, fix = (
            "the disk is full (or a file-size limit was hit)",
            "free space, or point hydra.run.dir at a disk with room, and resume",
        )
    elif (
        errno.EROFS in codes or errno.EACCES in codes or "Read-only file system" in text or "Permission denied" in text
    ):
        why, fix = (
            "the run dir is not writable (read-only or no permission)",
            "make it writable, or choose another hydra.run.dir, and resume",
        )
    else:
        why, fix = (
            f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}",
            "resume from the last checkpoint",
        )
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return CheckpointError(f"could not write checkpoint step {step} into {tmp.parent}: {why}; {fix}")


def global_batch(engine) -> int:
    """Sequences per optimizer step over all data-parallel ranks."""
    return int(engine.cfg.data.batch_size) * int(engine.cfg.trainer.grad_accum) * int(engine.data_parallel_rank[1])


STORAGE_KEYS = {
    "moments_dtype": "float32",
    "master_weights": False,
    "master_remainders": False,
}  # optim.*: how the state is kept, with defaults


def _say_if_optimizer_storage_changed(found: Path, engine, meta: dict | None) -> None:
    """A resume may switch optim.moments_dtype or optim.master_weights (the state is cast at load), but
    not silently: a run resumed without restating them would otherwise change memory and numerics."""
    saved = ((meta or {}).get("config") or {}).get("optim") or {}
    now = engine.cfg.optim
    for key, default in STORAGE_KEYS.items():
        before, after = saved.get(key, default), now.get(key, default)
        if before != after:
            log.warning(
                "checkpoint %s kept optim.%s=%s; this run uses %s (its state is converted at load): set optim.%s=%s to keep it",
                found,
                key,
                before,
                after,
                key,
                before,
            )


def _say_if_global_batch_changed(found: Path, trainer_state: dict, engine, meta: dict | None = None) -> None:
    saved, now = trainer_state.get("global_batch"), global_batch(engine)
    per = int(engine.cfg.trainer.grad_accum) * int(engine.data_parallel_rank[1])
    if saved is not None and saved != now:
        fix = (
            f"data.batch_size={saved // per}"
            if saved % per == 0
            else f"data.batch_size and trainer.grad_accum with a product of {saved} / {engine.data_parallel_rank[1]} ranks"
        )
        log.warning(
            "checkpoint %s trained with a global batch of %d sequences per step; this run's is %d (%d data-parallel ranks x data.batch_size=%s x "
            "trainer.grad_accum=%s): set %s to keep it",
            found,
            saved,
            now,
            engine.data_parallel_rank[1],
            engine.cfg.data.batch_size,
            engine.cfg.trainer.grad_accum,
            fix,
        )
        return
    saved_accum = ((meta or {}).get("config") or {}).get("trainer", {}).get("grad_accum")
    if saved is not None and isinstance(saved_accum, int) and saved_accum != int(engine.cfg.trainer.grad_accum):
        # the windows of a step are drawn per micro-batch (batch_size x ranks of them): same global batch, other windows
        log.warning(
            "checkpoint %s trained with trainer.grad_accum=%d; this run uses %d with the same global batch of %d sequences, so each step "
            "draws other windows than the uninterrupted run would have: keep trainer.grad_accum=%d (and data.batch_size x ranks) to "
            "continue it exactly",
            found,
            saved_accum,
            engine.cfg.trainer.grad_accum,
            now,
            saved_accum,
        )


def checkpoint_to_resume(resume, run_dir: Path) -> Path | None:
    """The checkpoint `resume` names (null: none; auto: this run's latest, if any; else a run or checkpoint dir)."""
    if resume is None:
        return None
    where = Path(run_dir) if resume == "auto" else Path(str(resume)).expanduser()
    found = ckpt.find_checkpoint(where)
    root = where / ckpt.CKPT_DIR if (where / ckpt.CKPT_DIR).is_dir() else where
    damaged = [] if ckpt.is_checkpoint(where) else ckpt.damaged_checkpoints(root)
    newer = [d for d in damaged if found is None or d.name > found.name]
    if newer:  # never skip a later checkpoint silently (and never overwrite it when the run gets there)
        older = f", or resume={found}" if found is not None else ""
        raise CheckpointError(
            f"{newer[-1]} is not a whole checkpoint ({_what_is_missing(newer[-1])}); move it out of {root} to resume from "
            f"{found.name if found is not None else 'scratch'}{older}"
        )
    deepspeed_like = (
        (where / ckpt.CKPT_DIR / "deepspeed").is_dir()
        or any(where.glob("mp_rank_*_model_states.pt"))
        or any(where.glob("*/mp_rank_*_model_states.pt"))
    )
    if found is None and deepspeed_like:
        raise CheckpointError(
            f"resume={resume}: {where} holds DeepSpeed checkpoints; resume them with engine=deepspeed, or convert one "
            f"for this engine: moeflow convert deepspeed-to-moeflow {where} OUT --trust-checkpoint"
        )
    if found is None and resume != "auto":
        raise CheckpointError(
            f"resume={resume}: no checkpoint found there; pass a run dir with checkpoints/ or a checkpoint dir"
        )
    if found is None:
        log.info("resume=auto: no checkpoint in %s, starting fresh", run_dir)
    return found


def _what_is_missing(p: Path) -> str:
    missing = [f for f in (ckpt.META, ckpt.DCP_INDEX) if not (p / f).is_file()]
    if missing and not any((p / f).is_file() for f in (ckpt.WEIGHTS, ckpt.WEIGHTS_INDEX)):
        return f"{' and '.join(missing)} missing"
    try:
        if (p / ckpt.DCP_INDEX).is_file():
            sharded.read_index(p)
        ckpt.read_meta(p)
    except CheckpointError as e:
        return str(e).split(": ", 1)[-1][:160]
    return "incomplete"


def resume_run(engine, engine_name: str) -> int:
    """Load the checkpoint `resume` asks for into the engine; the step to start at (0 for a fresh run)."""
    if _rank() == 0:  # this run holds the run dir's lock: every temporary folder there is its own predecessor's
        promoted, removed = ckpt.recover_temp_dirs(engine.run_dir, engine.cfg.trainer.keep_checkpoints)
        for p in promoted:
            log.warning("committed %s: its save had completed when the run that wrote it stopped", p)
        for p in removed:
            log.warning("removed %s, left by a save that did not complete", p)
    _barrier()
    found = checkpoint_to_resume(engine.cfg.resume, engine.run_dir)
    return 0 if found is None else load_into(engine, found, engine_name)


SCHEDULE_KEYS = (
    "lr",
    "min_lr",
    "warmup_steps",
    "schedule",
    "weight_decay",
    "betas",
    "eps",
)  # optim.*: the checkpoint's would silently win
ROUTING_KEYS = (
    "top_k",
    "gate",
    "rope_theta",
    "rope_scaling",
    "norm_eps",
)  # model.* that change the function without changing shapes


def changed_settings(meta: dict, cfg, model_cfg) -> list[str]:
    """The schedule and routing settings this run sets differently from the checkpoint's, as 'key: X -> Y'."""
    saved_optim = (meta.get("config") or {}).get("optim") or {}
    now_optim = OmegaConf.to_container(cfg.optim, resolve=True)
    out = [
        f"optim.{k}: {saved_optim[k]!r} -> {now_optim[k]!r}"
        for k in SCHEDULE_KEYS
        if k in saved_optim and k in now_optim and _norm(saved_optim[k]) != _norm(now_optim[k])
    ]
    saved_model, now_model = meta.get("model") or {}, model_cfg.to_dict()
    for k in ROUTING_KEYS:
        if k not in saved_model or _norm(saved_model[k]) == _norm(now_model.get(k)):
            continue
        if (
            k == "gate" and isinstance(saved_model[k], dict) and isinstance(now_model.get(k), dict)
        ):  # name the gate options that differ
            old, new = saved_model[k], now_model[k]
            out += [
                f"gate.{g}: {old.get(g)!r} -> {new.get(g)!r}"
                for g in sorted(set(old) | set(new))
                if _norm(old.get(g)) != _norm(new.get(g))
            ]
        else:
            out.append(f"model.{k}: {saved_model[k]!r} -> {now_model.get(k)!r}")
    return out


def _norm(v):
    return (
        [_norm(x) for x in v]
        if isinstance(v, (list, tuple))
        else ({k: _norm(x) for k, x in v.items()} if isinstance(v, dict) else v)
    )


def _take_new_optim_settings(engine) -> None:
    """trainer.allow_config_change: the run's optim.* replace the checkpoint's in the optimizer and schedule."""
    o, opt, sched = engine.cfg.optim, getattr(engine, "opt", None), getattr(engine, "sched", None)
    if opt is None or sched is None or not hasattr(sched, "base_lrs"):
        return
    for g in opt.param_groups:
        g.update(betas=tuple(float(b) for b in o.betas), eps=float(o.eps), initial_lr=float(o.lr))
        if g["params"] and all(
            p.dim() >= 2 for p in g["params"]
        ):  # the decay groups (matrices: optim.optimizer_groups)
            g["weight_decay"] = float(o.weight_decay)
    sched.base_lrs = [float(o.lr)] * len(opt.param_groups)
    factor = sched.lr_lambdas[0](sched.last_epoch) if hasattr(sched, "lr_lambdas") else 1.0
    for g in opt.param_groups:
        g["lr"] = float(o.lr) * factor


def _checked_step(found: Path, meta: dict, trainer_state: dict) -> int:
    """The step a checkpoint was written at, agreeing in trainer_state.json, meta.json and the folder name."""
    step = trainer_state.get("step")
    named = ckpt.STEP_NAME.fullmatch(found.name)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(
            f"checkpoint {found}: trainer_state.json has step {step!r}, not a step count; the file was edited or damaged: resume from another checkpoint"
        )
    if ("step" in meta and meta["step"] != step) or (named and int(named.group(1)) != step):
        raise CheckpointError(
            f"checkpoint {found}: its step disagrees between trainer_state.json ({step}), meta.json ({meta.get('step')}) "
            f"and the folder name; a file was edited or copied from another checkpoint: resume from another checkpoint"
        )
    return step


def load_into(engine, found: Path, engine_name: str) -> int:
    """Checkpoint `found` into the engine: weights, and unless weights-only, optimizer, schedule and
    RNG streams; the step it was written at (0 for weights-only). A checkpoint that lacks any of
    these, or whose schedule or routing settings differ from this run's, is refused in one line."""
    tc = engine.cfg.trainer
    trust, verify = bool(tc.get("trust_checkpoint", False)), bool(tc.get("verify_checkpoint", True))
    meta = ckpt.read_meta(found)
    ckpt.check_compatible(found, meta.get("model", {}), engine.model_cfg, ckpt.stored_weight_shapes(found, trust))
    weights_only = bool(meta.get("weights_only"))
    trainer_state = None if weights_only else ckpt.load_trainer_state(found)
    if not weights_only and trainer_state is None:
        raise CheckpointError(
            f"checkpoint {found} has no {ckpt.TRAINER_STATE} and meta.json does not mark it weights-only: it is incomplete; "
            f'resume from another checkpoint (or start from its weights alone after adding "weights_only": true to its meta.json)'
        )
    step = 0 if trainer_state is None else _checked_step(found, meta, trainer_state)
    changes = [] if trainer_state is None else changed_settings(meta, engine.cfg, engine.model_cfg)
    allow = bool(tc.get("allow_config_change", False))
    if changes and not allow:
        raise CheckpointError(
            f"resume from {found} with settings that differ from the checkpoint's ({'; '.join(changes)}): "
            f"resume with the checkpoint's values (see its meta.json), or pass trainer.allow_config_change=true to take this run's"
        )
    rng = None
    if trainer_state is not None:
        rng = _rng_for_this_rank(found, meta, trainer_state)
    if ckpt.is_sharded(found):
        saved_by = (trainer_state or {}).get("engine", meta.get("engine"))
        same_optimizer = (
            trainer_state is not None and saved_by == engine_name
        )  # optimizer state is only ever the same engine's
        if trainer_state is not None and not same_optimizer:
            log.warning(
                "checkpoint %s was written by engine=%s: its weights and schedule carry over, AdamW moments start from zero",
                found,
                saved_by,
            )
        state = engine.checkpoint_state(with_optimizer=same_optimizer)
        sharded.load_sharded(found, state, verify=verify, trust=trust)
    else:
        state = None
        engine.load_full_weights(ckpt.load_model_state(found, verify=verify))
    engine.load_checkpoint_state(state, trainer_state)
    if trainer_state is None:
        log.info("initialised from weights-only checkpoint %s; fresh optimizer and schedule at step 0", found)
        return 0
    if changes:
        log.warning(
            "resume from %s takes this run's settings over the checkpoint's (trainer.allow_config_change=true): %s",
            found,
            "; ".join(changes),
        )
        _take_new_optim_settings(engine)
    _say_if_global_batch_changed(found, trainer_state, engine, meta)
    _say_if_optimizer_storage_changed(found, engine, meta)
    if rng is not None:
        ckpt.set_rng_state(rng)
    log.info("resumed from %s at step %d", found, step)
    return step


def _rng_for_this_rank(found: Path, meta: dict, trainer_state: dict) -> dict | None:
    """This rank's RNG streams: its own file where the writing run had this rank, rank 0's where it
    did not (another world size); a refusal where a file the writing run wrote is gone. A converted
    checkpoint has none (fresh streams)."""
    rank, saved_world = _rank(), meta.get("world_size")
    own, zero = ckpt.rng_file(found, rank), ckpt.rng_file(found, 0)
    if own.is_file():
        return ckpt.read_rng(found, rank)
    if trainer_state.get("rng") is not None:  # older moeflow versions kept them in trainer_state
        return trainer_state["rng"]
    if meta.get("converted_from") is not None:
        return None
    if (isinstance(saved_world, int) and rank < saved_world) or not zero.is_file():
        missing = own if isinstance(saved_world, int) and rank < saved_world else zero
        raise CheckpointError(
            f"checkpoint {found} is incomplete: {missing.relative_to(found)} (RNG streams) is missing; resume from another checkpoint"
        )
    return ckpt.read_rng(found, 0)
