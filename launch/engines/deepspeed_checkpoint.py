"""engine=deepspeed's checkpoints: DeepSpeed's own format, written, found and resumed.

`<run>/checkpoints/deepspeed/step_XXXXXXXX/`: every rank's DeepSpeed shards plus a meta.json
(model config, run config, step), written last, that marks a complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from moeflow.moe.errors import CheckpointError

from .. import checkpoint as ckpt

log = logging.getLogger("moeflow.deepspeed")

DS_DIR = "deepspeed"  # under <run>/checkpoints/


def tag(step: int) -> str:
    return f"{ckpt.PREFIX}{step:08d}"


def save(engine, run_dir: Path, step: int, cfg: DictConfig, model_cfg: dict, is_main: bool) -> Path:
    """DeepSpeed checkpoint (every rank writes its shard) + meta.json; prunes old ones."""
    import torch.distributed as dist

    root = Path(run_dir) / ckpt.CKPT_DIR / DS_DIR
    engine.save_checkpoint(str(root), tag=tag(step), client_state={"step": step, "rng": ckpt.rng_state()})
    if is_main:  # meta.json last: its presence marks a complete checkpoint
        meta = {
            "model": model_cfg,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "step": step,
            "format": "deepspeed",
        }
        (root / tag(step) / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        keep = int(cfg.trainer.keep_checkpoints)
        if keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return root / tag(step)


def _is_deepspeed_checkpoint(p: Path) -> bool:
    return (p / ckpt.META).is_file() and (
        any(p.glob("mp_rank_*_model_states.pt")) or any(p.glob("zero_pp_rank_*_model_states.pt"))
    )


def list_checkpoints(root: Path) -> list[Path]:
    """The complete DeepSpeed checkpoints under `root` (meta.json, written last, marks one), by step."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(ckpt.PREFIX) and _is_deepspeed_checkpoint(p)]
    return sorted(done, key=lambda p: int(p.name[len(ckpt.PREFIX) :]))


def find_checkpoint(path: str | Path) -> Path | None:
    """A DeepSpeed checkpoint tag dir, or the latest one of a run dir."""
    p = Path(path)
    if _is_deepspeed_checkpoint(p):
        return p
    found = list_checkpoints(p / ckpt.CKPT_DIR / DS_DIR) or list_checkpoints(p / DS_DIR) or list_checkpoints(p)
    return found[-1] if found else None


def resume(engine, cfg: DictConfig, run_dir: Path) -> int:
    """Load the checkpoint `resume` points to into the engine; return the step to start at."""
    if cfg.resume is None:
        return 0
    where = run_dir if cfg.resume == "auto" else Path(str(cfg.resume)).expanduser()
    found = find_checkpoint(where)
    if found is None:
        if cfg.resume == "auto":
            log.info("resume=auto: no DeepSpeed checkpoint in %s, starting fresh", run_dir)
            return 0
        raise CheckpointError(
            f"resume={cfg.resume}: no DeepSpeed checkpoint found there; pass a run dir of an engine=deepspeed run or one of its checkpoints/deepspeed/step_* dirs"
        )
    meta = ckpt.read_meta(found)
    diffs = ckpt.model_shape_diffs(meta.get("model", {}), engine.module.cfg.to_dict())
    if diffs:
        raise CheckpointError(
            f"checkpoint {found} is from a different model shape ({'; '.join(diffs)}); resume with the checkpoint's model config (see {found / 'meta.json'})"
        )
    if not cfg.engine.trust_checkpoint:
        raise CheckpointError(
            f"resume={cfg.resume} would load {found}: {PICKLE_WARNING}; pass engine.trust_checkpoint=true to resume it"
        )
    saved_ep, ep = checkpoint_ep(meta), int(cfg.parallel.ep)
    if saved_ep != ep:
        raise CheckpointError(
            f"checkpoint {found} was written with parallel.ep={saved_ep} and ZeRO keeps expert state per EP rank; resume with parallel.ep={saved_ep}, or convert it (moeflow convert deepspeed-to-moeflow) and resume the moeflow checkpoint with any EP"
        )
    try:
        path, client = engine.load_checkpoint(str(found.parent), tag=found.name)
    except Exception as e:  # DeepSpeed raises many types for partial/corrupt shards
        raise CheckpointError(
            f"DeepSpeed could not load {found} ({type(e).__name__}: {e}); resume from an earlier checkpoint"
        ) from None
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint in {found}; resume from an earlier checkpoint")
    if ep > 1:
        # DeepSpeed loaded rank 0's module file on every rank (it has no per-expert files from us:
        # see _deepspeed_moe_marker), so other EP ranks hold rank 0's experts; ZeRO's fp32 partitions
        # of this rank are right: copy them back into the model, as after an optimizer step.
        engine.optimizer.update_lp_params()
    ckpt.set_rng_state(client["rng"])
    log.info("resumed DeepSpeed checkpoint %s at step %d", found, client["step"])
    return int(client["step"])


def checkpoint_ep(meta: dict) -> int:
    return int(meta.get("config", {}).get("parallel", {}).get("ep", 1))


PICKLE_WARNING = (
    "DeepSpeed's checkpoints are pickles (its own format), and unpickling can run any code the files hold; "
    "load only checkpoints you (or someone you trust) wrote"
)
