"""engine=deepspeed's checkpoints into moeflow's: DeepSpeed's ZeRO partitions consolidated into one state dict.

`convert_to_moeflow` (`moeflow convert deepspeed-to-moeflow`) consolidates a DeepSpeed
checkpoint (any ZeRO stage; ZeRO-1/2 with expert parallelism too) into a moeflow
safetensors checkpoint that engine=torch resumes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from moeflow.moe.errors import CheckpointError
from moeflow.moe.model import Transformer
from moeflow.parallel.plan import is_expert

from .. import checkpoint as ckpt
from ..optim import fresh_optimizer_state
from .deepspeed_checkpoint import PICKLE_WARNING, checkpoint_ep, find_checkpoint


def consolidated_state_dict(ds_ckpt: Path, ep: int = 1) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint (any ZeRO stage, any world size) as one state dict."""
    if ep > 1:
        state = _consolidate_expert_parallel(ds_ckpt, ep)
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ds_ckpt.parent), tag=ds_ckpt.name)
    return {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}


def _consolidate_expert_parallel(ds_ckpt: Path, ep: int) -> dict[str, torch.Tensor]:
    """DeepSpeed's zero_to_fp32 merge, per group of ranks, for a ZeRO-1/2 checkpoint of an EP run.

    zero_to_fp32 concatenates every param group's partitions over the whole world, but an
    expert group holds different experts on each EP rank, partitioned only over that rank's
    expert-data-parallel ranks (r, r + ep, ...; file i is dp rank i). So dense groups are
    merged over all ranks, expert groups per EP rank over its EDP ranks, and the EP ranks'
    expert shards (experts r*E/ep ... in rank order) are concatenated along the expert dim.
    """
    from dataclasses import replace

    from deepspeed.utils import zero_to_fp32 as z

    d = str(ds_ckpt)
    model_state = z.parse_model_states(z.get_model_state_files(d))[0]
    stage, world, flat, paddings = z.parse_optim_states(z.get_optim_files(d), d)
    if stage > 2:
        raise CheckpointError(
            f"{ds_ckpt}: a ZeRO-{stage} checkpoint with parallel.ep={ep} is not something engine=deepspeed writes"
        )
    shapes = model_state.param_shapes
    expert_group = [bool(g) and all(is_expert(n) for n in g) for g in shapes]

    def merge(group_ids: list[int], ranks) -> dict:
        out = {}
        sub = replace(model_state, param_shapes=[shapes[i] for i in group_ids])
        z._zero2_merge_trainable_params(
            out,
            len(ranks),
            [[flat[r][i] for i in group_ids] for r in ranks],
            [sub],
            None if paddings is None else [paddings[i] for i in group_ids],
        )
        return out

    state = dict(model_state.buffers)
    state.update(merge([i for i, e in enumerate(expert_group) if not e], range(world)))
    shards = [merge([i for i, e in enumerate(expert_group) if e], range(r, world, ep)) for r in range(ep)]
    state.update({name: torch.cat([s[name] for s in shards]) for name in shards[0]})
    for alias, target in model_state.shared_params:  # tied weights
        if target in state:
            state[alias] = state[target]
    return state


def convert_to_moeflow(src: str | Path, out_run_dir: str | Path, trust: bool = False) -> Path:
    """Write `<out_run_dir>/checkpoints/step_N/` (moeflow layout) from a DeepSpeed checkpoint.

    The result holds the consolidated fp32 weights, the model config, the step and the lr
    schedule at that step, so `moeflow train resume=<it>` (engine=torch)
    continues the schedule. AdamW's moments are not carried over (ZeRO stores them as flat
    per-rank partitions): the resumed optimizer starts them from zero; meta.json says so.
    """
    from moeflow.moe.model import ModelConfig

    found = find_checkpoint(src)
    if found is None:
        raise CheckpointError(
            f"{src}: no DeepSpeed checkpoint there; pass an engine=deepspeed run dir or its checkpoints/deepspeed/step_* dir"
        )
    if not trust:
        raise CheckpointError(f"{found}: {PICKLE_WARNING}; pass --trust-checkpoint to convert it")
    meta = ckpt.read_meta(found)
    step = int(meta["step"])
    state = consolidated_state_dict(found, checkpoint_ep(meta))
    model_cfg = ModelConfig(**{**meta["model"], "experts_impl": "torch"})
    with torch.device("meta"):
        model = Transformer(model_cfg)
    want = set(dict(model.named_parameters()))  # tied weights once, like ckpt.unique_state_dict
    if want - set(state) or set(state) - set(model.state_dict()):
        raise CheckpointError(
            f"{found}: weights do not match the model in its meta.json (missing {sorted(want - set(state))[:3]}, extra {sorted(set(state) - want)[:3]})"
        )
    state = {k: state[k] for k in sorted(want)}
    _, sched_state = fresh_optimizer_state(
        model_cfg, OmegaConf.create(meta["config"]["optim"]), int(meta["config"]["trainer"]["steps"]), step
    )
    trainer_state = {"scheduler": sched_state, "step": step, "engine": "deepspeed"}
    out_meta = {
        "model": meta["model"],
        "config": meta["config"],
        "converted_from": {
            "format": "deepspeed",
            "path": str(found),
            "optimizer_moments": "reset (not carried over from ZeRO partitions)",
        },
    }
    return ckpt.save_checkpoint(Path(out_run_dir), step, state, trainer_state, out_meta, keep=0)
