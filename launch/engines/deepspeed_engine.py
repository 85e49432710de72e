"""engine=deepspeed: DeepSpeed owns the step; the loop is `launch/train.py`'s.

What changes against engine=torch is who does the step: `engine.backward` in
`forward_backward` (loss scaling by 1/grad_accum, ZeRO gradient reduction on the step's last
micro-batch, which `set_gradient_accumulation_boundary` marks), `engine.step` in
`optimizer_step` (clipping, optimizer, scheduler, once per step) and DeepSpeed checkpoints.
Launch several processes with torchrun (or `deepspeed`); the process group is joined the same
way as the torch engine.

Everything DeepSpeed-specific lives here: config generation, `deepspeed.initialize`, checkpoints.
With expert parallelism (`parallel.ep > 1`, ZeRO-1/2, CPU optimizer offload too) moeflow
shards the experts and routes through its all-to-all dispatcher, and DeepSpeed's MoE
machinery reduces and ZeRO-partitions the expert groups over the expert-data-parallel
groups (`shard_experts_for_deepspeed`, `_deepspeed_moe_marker`).

The DeepSpeed config is generated from the Hydra config (micro-batch, grad accumulation,
clipping, ZeRO stage, CPU optimizer offload, bf16) and a user JSON (`engine.config_file`)
is merged over it, so anything DeepSpeed offers stays reachable. The optimizer is
moeflow's AdamW over `moeflow.parallel.expert_params.param_groups`: expert parameters sit
in their own groups, which is what lets ZeRO shard them over the expert-data-parallel
group instead of the whole world once experts are sharded over EP (DeepSpeed-MoE's
`moe: True` groups, see `to_deepspeed_moe_groups`).

Checkpoints are DeepSpeed's own (`<run>/checkpoints/deepspeed/step_XXXXXXXX/`, plus a
meta.json with the model config); `convert_to_moeflow` consolidates one (any ZeRO stage)
into a moeflow safetensors checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from moeflow.moe.errors import CheckpointError, ConfigError
from moeflow.moe.model import Transformer
from moeflow.parallel.distributed import DistEnv
from moeflow.parallel.expert_params import ep_group_name, is_expert_param, mark_expert_params, param_groups

from .. import checkpoint as ckpt
from ..losses import lm_loss
from ..optim import build_scheduler, fresh_optimizer_state
from ..profiling import phase
from ..runtime import bf16_autocast, start_distributed
from .contract import Engine

log = logging.getLogger("moeflow.deepspeed")

DS_DIR = "deepspeed"  # under <run>/checkpoints/


def _engine_cfg(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.engine, resolve=True)


# DeepSpeed keys moeflow derives from its own config: a user JSON may repeat them only with the
# same value; otherwise the run would silently not be the one the moeflow config describes.
DERIVED_KEYS = {
    ("train_micro_batch_size_per_gpu",): "data.batch_size",
    ("gradient_accumulation_steps",): "trainer.grad_accum",
    ("gradient_clipping",): "optim.grad_clip",
    ("zero_optimization", "stage"): "engine.zero_stage",
    ("bf16", "enabled"): "trainer.precision",
    ("fp16", "enabled"): "trainer.precision",
    ("optimizer",): "optim.* (moeflow's AdamW is the optimizer)",
    ("scheduler",): "optim.schedule and optim.warmup_steps (moeflow's schedule)",
    ("train_batch_size",): "data.batch_size x trainer.grad_accum x the number of ranks",
}


def _lookup(d: dict, path: tuple):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return _MISSING
        d = d[k]
    return d


_MISSING = object()


def _bf16(cfg: DictConfig, device) -> bool:
    return cfg.trainer.precision == "bf16" or (cfg.trainer.precision == "auto" and device is not None and device.type == "cuda")


def check_user_config(cfg: DictConfig, device=None) -> None:
    """Every key of engine.config_file that moeflow derives must agree with the derived value."""
    path = _engine_cfg(cfg).get("config_file")
    if not path:
        return
    user = read_user_config(path)
    generated = deepspeed_config(cfg, use_bf16=_bf16(cfg, device), include_user=False)
    for key, moeflow_key in DERIVED_KEYS.items():
        theirs, ours = _lookup(user, key), _lookup(generated, key)
        if theirs is _MISSING or theirs == ours:
            continue
        shown = ".".join(key)
        raise ConfigError(f"engine.config_file={path} sets {shown}={json.dumps(theirs)}, which moeflow derives from {moeflow_key}"
                          f"{'' if ours is _MISSING else f' (here {json.dumps(ours)})'}; set it there and remove {shown} from the file")


def check_options(cfg: DictConfig, model_cfg=None, device=None) -> None:
    """Reject option combinations DeepSpeed cannot run, saying which and why (on the merged config)."""
    e = _engine_cfg(cfg)
    path = e.get("config_file")
    if path and not Path(str(path)).expanduser().is_file():
        raise ConfigError(f"engine.config_file={path} does not exist; pass the path of a DeepSpeed JSON config (or null)")
    check_user_config(cfg, device)
    merged = deepspeed_config(cfg, use_bf16=_bf16(cfg, device))
    zero = merged.get("zero_optimization", {})
    stage, offload = zero.get("stage"), "offload_optimizer" in zero and zero["offload_optimizer"].get("device", "none") != "none"
    ep = int(cfg.parallel.get("ep", 1))
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine.zero_stage={stage!r} is not a ZeRO stage; use 0, 1, 2 or 3")
    if offload and stage == 0:
        raise ConfigError("engine.offload_optimizer=true needs ZeRO (DeepSpeed offloads the partitioned optimizer state); set engine.zero_stage=1, 2 or 3")
    if ep > 1 and stage == 3:
        raise ConfigError(f"engine.zero_stage=3 conflicts with parallel.ep={ep}: DeepSpeed's ZeRO-3 takes expert parallelism only for its own AutoEP layers ('Native DeepSpeed MoE is not supported with ZeRO Stage 3'), not for moeflow's MoE layers; use engine.zero_stage=1 or 2 with expert parallelism")
    if ep > 1 and stage == 0:
        raise ConfigError(f"engine.zero_stage=0 conflicts with parallel.ep={ep}: without ZeRO, DeepSpeed clips by the mean of per-rank gradient norms, which with experts sharded over EP is not the global norm; use engine.zero_stage=1 or 2 with expert parallelism")


def read_user_config(path) -> dict:
    try:
        return json.loads(Path(str(path)).expanduser().read_text())
    except ValueError as err:
        raise ConfigError(f"engine.config_file={path} is not valid JSON ({err}); fix the file") from None


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: DictConfig, use_bf16: bool, include_user: bool = True) -> dict:
    """The DeepSpeed JSON for this Hydra config (the user JSON merged over it, its derived keys checked to agree)."""
    e = _engine_cfg(cfg)
    zero = {"stage": int(e["zero_stage"]), "contiguous_gradients": True, "reduce_scatter": True, "overlap_comm": False}
    if e.get("offload_optimizer"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    generated = {
        "train_micro_batch_size_per_gpu": int(cfg.data.batch_size),
        "gradient_accumulation_steps": int(cfg.trainer.grad_accum),
        "gradient_clipping": float(cfg.optim.grad_clip),  # 0 disables, like the torch engine
        "zero_optimization": zero,
        "bf16": {"enabled": bool(use_bf16)},
        # moeflow's AdamW (torch) is the optimizer: allow it under ZeRO and offload
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if include_user and e.get("config_file"):
        generated = _merge(generated, read_user_config(e["config_file"]))
    return generated


def to_deepspeed_moe_groups(groups: list[dict]) -> list[dict]:
    """Mark expert groups the way DeepSpeed-MoE expects (for EP > 1).

    DeepSpeed's ZeRO reduces a group's gradients over `expert_data_parallel_group[name]`
    when the group has `moe: True`, and each of its params `allreduce=False` plus
    `group_name` (what `split_params_into_different_moe_groups_for_optimizer` produces).
    """
    out = []
    for g in groups:
        g = dict(g)
        if g.get("moe_expert"):
            for p in g["params"]:
                p.allreduce = False
                p.group_name = g["ep_group_name"]
            g.update(moe=True, name=g["ep_group_name"])
        out.append(g)
    return out


def _deepspeed_moe_marker(num_experts: int, ep: int) -> torch.nn.Module:
    """A parameter-free `deepspeed.moe.layer.MoE` that tells DeepSpeed the model has expert parallelism.

    DeepSpeed switches its MoE handling on (`engine.has_moe_layers`: ZeRO-1/2 partition and
    reduce `moe: True` groups over `expert_data_parallel_group[name]`, the gradient norm counts
    each expert once) only when it finds one of its own `MoE` modules in the model, and
    `deepspeed.initialize` takes no flag for it. Of the ways to say so (subclassing its
    engine, setting the flag after initialize — too late, the optimizer is built inside —
    or pretending moeflow's layers are DeepSpeed's), one empty marker per moeflow MoE layer is
    the least intrusive: it owns no parameters (moeflow's experts stay where they are), it
    creates no groups (`shard_experts_for_deepspeed` created them), and with
    `num_local_experts = 0` DeepSpeed writes and reads no per-expert checkpoint files; the
    expert weights live in ZeRO's fp32 partitions (see `resume` and `convert_to_moeflow`).
    """
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoEMarker(MoE):
        def __init__(self):
            torch.nn.Module.__init__(self)  # not MoE.__init__: no DeepSpeed gate or experts
            self.num_experts, self.ep_size, self.use_residual = num_experts, ep, False
            self.expert_group_name = ep_group_name(ep)
            self.num_local_experts = 0  # no layer_*_expert_*_model_states.pt files

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # groups already created, consistent with moeflow's layout

        def forward(self, *args):
            raise RuntimeError("DeepSpeedMoEMarker only marks a moeflow MoE layer for DeepSpeed; it does not compute")

    return DeepSpeedMoEMarker()


def shard_experts_for_deepspeed(model: torch.nn.Module, parallel_cfg, device_type: str) -> None:
    """moeflow's expert parallelism (expert shards, all-to-all dispatcher) with DeepSpeed's groups.

    `apply_expert_parallel` without moeflow's DDP: DeepSpeed reduces the gradients. Its
    expert-parallel groups are consecutive ranks and its expert-data-parallel groups strided
    ones (`groups._create_expert_and_data_parallel`, E + D order), which is moeflow's
    ("dp", "ep") DeviceMesh; checked here. Gradient scale: ZeRO divides every gradient by
    the data-parallel world size and sums expert gradients over the expert-data-parallel
    group, which is `ExpertDataParallel.finish_grad_sync` (EDP sum / world): the
    single-process model's gradients.
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import groups

    from moeflow.parallel.expert_parallel import apply_expert_parallel
    from moeflow.parallel.layout import build_layout

    ep = int(parallel_cfg.ep)
    layout = build_layout(ep, model.cfg.num_experts, device_type)
    apply_expert_parallel(model, layout, int(parallel_cfg.overlap_chunks), bool(parallel_cfg.overlap_shared))
    mark_expert_params(model, ep_size=ep)
    name = ep_group_name(ep)
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing process group (deepspeed.comm)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)
    for ours, theirs in ((layout.ep_group, groups._get_expert_parallel_group(name)), (layout.edp_group, groups._get_expert_data_parallel_group(name))):
        if dist.get_process_group_ranks(ours) != dist.get_process_group_ranks(theirs):
            raise RuntimeError(f"DeepSpeed's {name} groups {dist.get_process_group_ranks(theirs)} differ from moeflow's {dist.get_process_group_ranks(ours)}")
    for layer in model.moe_layers():
        layer.add_module("deepspeed_moe_marker", _deepspeed_moe_marker(model.cfg.num_experts, ep))


def initialize(model: torch.nn.Module, cfg: DictConfig, use_bf16: bool):
    """`deepspeed.initialize` with moeflow's AdamW and schedule; returns (engine, scheduler)."""
    import deepspeed
    import torch.distributed as dist

    build_ops(progress=log.info)  # before DeepSpeed's own comm setup loads them: moeflow's guard against stale locks
    if not dist.is_initialized():  # one process: a private group, or DeepSpeed goes looking for MPI
        backend = "nccl" if next(model.parameters()).is_cuda else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it is set (torchrun sets it)
    ep = int(cfg.parallel.get("ep", 1))
    if ep > 1:
        shard_experts_for_deepspeed(model, cfg.parallel, next(model.parameters()).device.type)
    elif dist.get_world_size() > 1:  # like the torch engine: routing statistics and aux losses over the global batch
        for layer in model.moe_layers():
            layer.gate.token_group = dist.group.WORLD
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if ep > 1:
        groups = to_deepspeed_moe_groups(groups)
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    sched = build_scheduler(opt, o, cfg.trainer.steps)
    config = deepspeed_config(cfg, use_bf16)
    engine, _, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    n_expert = sum(p.numel() for n, p in model.named_parameters() if is_expert_param(n, p))
    log.info("deepspeed: ZeRO stage %d%s, bf16 %s, %d param groups (%.2fM expert params in their own groups%s)",
             config["zero_optimization"]["stage"], " + CPU optimizer offload" if "offload_optimizer" in config["zero_optimization"] else "",
             config["bf16"]["enabled"], len(groups), n_expert / 1e6, f", sharded over EP={ep} and ZeRO-partitioned over the expert-data-parallel group" if ep > 1 else "")
    return engine, sched


def tag(step: int) -> str:
    return f"{ckpt.PREFIX}{step:08d}"


def save(engine, run_dir: Path, step: int, cfg: DictConfig, model_cfg: dict, is_main: bool) -> Path:
    """DeepSpeed checkpoint (every rank writes its shard) + meta.json; prunes old ones."""
    import torch.distributed as dist

    root = Path(run_dir) / ckpt.CKPT_DIR / DS_DIR
    engine.save_checkpoint(str(root), tag=tag(step), client_state={"step": step, "rng": ckpt.rng_state()})
    if is_main:  # meta.json last: its presence marks a complete checkpoint
        meta = {"model": model_cfg, "config": OmegaConf.to_container(cfg, resolve=True), "step": step, "format": "deepspeed"}
        (root / tag(step) / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        keep = int(cfg.trainer.keep_checkpoints)
        if keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return root / tag(step)


def _is_deepspeed_checkpoint(p: Path) -> bool:
    return (p / ckpt.META).is_file() and (any(p.glob("mp_rank_*_model_states.pt")) or any(p.glob("zero_pp_rank_*_model_states.pt")))


def list_checkpoints(root: Path) -> list[Path]:
    """The complete DeepSpeed checkpoints under `root` (meta.json, written last, marks one), by step."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(ckpt.PREFIX) and _is_deepspeed_checkpoint(p)]
    return sorted(done, key=lambda p: int(p.name[len(ckpt.PREFIX):]))


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
        raise CheckpointError(f"resume={cfg.resume}: no DeepSpeed checkpoint found there; pass a run dir of an engine=deepspeed run or one of its checkpoints/deepspeed/step_* dirs")
    meta = ckpt.read_meta(found)
    diffs = ckpt.model_shape_diffs(meta.get("model", {}), engine.module.cfg.to_dict())
    if diffs:
        raise CheckpointError(f"checkpoint {found} is from a different model shape ({'; '.join(diffs)}); resume with the checkpoint's model config (see {found / 'meta.json'})")
    if not bool(cfg.engine.get("trust_checkpoint", False)):
        raise CheckpointError(f"resume={cfg.resume} would load {found}: {PICKLE_WARNING}; pass engine.trust_checkpoint=true to resume it")
    saved_ep, ep = checkpoint_ep(meta), int(cfg.parallel.get("ep", 1))
    if saved_ep != ep:
        raise CheckpointError(f"checkpoint {found} was written with parallel.ep={saved_ep} and ZeRO keeps expert state per EP rank; resume with parallel.ep={saved_ep}, or convert it (moeflow convert deepspeed-to-moeflow) and resume the moeflow checkpoint with any EP")
    try:
        path, client = engine.load_checkpoint(str(found.parent), tag=found.name)
    except Exception as e:  # DeepSpeed raises many types for partial/corrupt shards
        raise CheckpointError(f"DeepSpeed could not load {found} ({type(e).__name__}: {e}); resume from an earlier checkpoint") from None
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
        raise CheckpointError(f"{ds_ckpt}: a ZeRO-{stage} checkpoint with parallel.ep={ep} is not something engine=deepspeed writes")
    shapes = model_state.param_shapes
    is_expert = [bool(g) and all(is_expert_param(n, torch.empty(0)) for n in g) for g in shapes]

    def merge(group_ids: list[int], ranks) -> dict:
        out = {}
        sub = replace(model_state, param_shapes=[shapes[i] for i in group_ids])
        z._zero2_merge_trainable_params(out, len(ranks), [[flat[r][i] for i in group_ids] for r in ranks], [sub],
                                        None if paddings is None else [paddings[i] for i in group_ids])
        return out

    state = dict(model_state.buffers)
    state.update(merge([i for i, e in enumerate(is_expert) if not e], range(world)))
    shards = [merge([i for i, e in enumerate(is_expert) if e], range(r, world, ep)) for r in range(ep)]
    state.update({name: torch.cat([s[name] for s in shards]) for name in shards[0]})
    for alias, target in model_state.shared_params:  # tied weights
        if target in state:
            state[alias] = state[target]
    return state


PICKLE_WARNING = ("DeepSpeed's checkpoints are pickles (its own format), and unpickling can run any code the files hold; "
                  "load only checkpoints you (or someone you trust) wrote")


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
        raise CheckpointError(f"{src}: no DeepSpeed checkpoint there; pass an engine=deepspeed run dir or its checkpoints/deepspeed/step_* dir")
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
        raise CheckpointError(f"{found}: weights do not match the model in its meta.json (missing {sorted(want - set(state))[:3]}, extra {sorted(set(state) - want)[:3]})")
    state = {k: state[k] for k in sorted(want)}
    _, sched_state = fresh_optimizer_state(model_cfg, OmegaConf.create(meta["config"]["optim"]), int(meta["config"]["trainer"]["steps"]), step)
    trainer_state = {"scheduler": sched_state, "step": step, "engine": "deepspeed"}
    out_meta = {"model": meta["model"], "config": meta["config"],
                "converted_from": {"format": "deepspeed", "path": str(found), "optimizer_moments": "reset (not carried over from ZeRO partitions)"}}
    return ckpt.save_checkpoint(Path(out_run_dir), step, state, trainer_state, out_meta, keep=0)


class DeepSpeedEngine(Engine):
    """The engine contract (`contract.Engine`); DeepSpeed owns backward, step and checkpoints."""

    name = "deepspeed"

    start = staticmethod(lambda cfg, trainer_cfg: start_distributed(trainer_cfg, cfg.parallel.backend))

    def __init__(self, cfg: DictConfig, model_cfg, trainer_cfg, env: DistEnv, device: torch.device, run_dir: Path):
        self.cfg, self.model_cfg, self.env, self.device, self.run_dir = cfg, model_cfg, env, device, run_dir
        use_bf16, _ = bf16_autocast(trainer_cfg, device)
        self.autocast = lambda: torch.autocast(device.type, enabled=False)  # noqa: E731  (DeepSpeed casts the model itself)
        self.model = Transformer(model_cfg).to(device)
        self.engine, self.sched = initialize(self.model, cfg, use_bf16)
        self.data_parallel_rank, self.data_parallel_group = (env.rank, env.world_size), None
        self.eval_model = self.engine  # under ZeRO-3 the engine's forward gathers the partitioned parameters
        self.start_step = resume(self.engine, cfg, run_dir)

    def describe(self) -> str:
        return f"model: {self.model.num_params() / 1e6:.2f}M parameters, device {self.device}, world {self.env.world_size}, engine deepspeed"

    def forward_backward(self, x, y, last: bool):
        # the step's last micro-batch is the accumulation boundary (ZeRO reduces there), whatever DeepSpeed's micro-step count says
        self.engine.set_gradient_accumulation_boundary(last)
        loss = lm_loss(self.engine(x), y)
        aux = self.model.aux_loss().to(device=loss.device, dtype=loss.dtype)
        phase("forward")  # phase times of `moeflow bench train`; a no-op otherwise
        self.engine.backward(loss + aux)  # DeepSpeed divides by grad_accum
        phase("backward")
        return loss, aux

    def optimizer_step(self) -> torch.Tensor | None:
        """DeepSpeed's step (clipping, optimizer, scheduler) once per step, at the boundary the last
        micro-batch set; its global gradient norm as a tensor (None without clipping), not read here."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None or isinstance(norm, torch.Tensor):
            return norm
        return torch.tensor(float(norm))  # a host number already (some of its optimizers keep one): wrapped, as every engine returns a tensor

    def save(self, step: int) -> Path:
        path = save(self.engine, self.run_dir, step, self.cfg, self.model_cfg.to_dict(), self.env.is_main)
        if self.env.is_main:
            log.info("saved DeepSpeed checkpoint %s", path)
        return path

    def extra_result(self) -> dict:
        return {"param_dtype": str(next(self.engine.module.parameters()).dtype)}


# -- DeepSpeed's JIT-built ops -----------------------------------------------------------
# DeepSpeed builds its CPU communication op with torch's JIT extension builder on first use.
# torch marks a build in progress with a `lock` file in the build directory, which a killed
# build leaves behind: every later run then waits on it forever. moeflow builds the ops first,
# one process at a time (an fcntl lock, released by the kernel when its holder dies), and
# before building removes a `lock` whose owner is gone: older than a live no-op load takes,
# and no process (ninja, the compiler) working in that directory.
JIT_OPS = ("ShareMemCommBuilder",)
STALE_AFTER_S = 30.0


def _busy(build_dir: Path) -> bool:
    """Whether any process has `build_dir` as its working directory (a build running there)."""
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if Path(os.readlink(cwd)) == build_dir:
                return True
        except OSError:
            continue
    return False


def clear_stale_build_lock(build_dir: Path) -> bool:
    """Remove torch's build lock in `build_dir` if its owner is gone; whether one was removed."""
    import time

    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_AFTER_S or _busy(build_dir):
        return False
    log.warning("removing a stale DeepSpeed build lock %s (%.0f s old, no build running there: a killed build left it)", lock, age)
    lock.unlink(missing_ok=True)
    return True


def build_ops(progress=print) -> list[str]:
    """Build (or load, when already built) the DeepSpeed ops moeflow's runs use; their names.
    Under torch.distributed every rank takes part (a barrier at the end: no rank's own DeepSpeed
    load overlaps another rank's stale-lock check)."""
    import fcntl

    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    built = []
    for op in JIT_OPS:
        builder = get_accelerator().create_op_builder(op)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue
        build_dir = Path(_get_build_directory(builder.NAME, False)).resolve()
        with open(build_dir.parent / f".moeflow-build-{builder.NAME}.lock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # another moeflow process building it: wait for it (it may die: then we get it)
            clear_stale_build_lock(build_dir)
            if not any(build_dir.glob("*.so")):
                progress(f"moeflow: building DeepSpeed's {builder.NAME} op in {build_dir} (the first time only, ~1 min)")
            builder.load(verbose=False)
        built.append(builder.NAME)
    if dist.is_initialized():
        dist.barrier()
    return built
