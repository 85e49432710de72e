"""Turn a composed Hydra config into validated objects, failing early with one-line errors.

Everything here runs before any training starts (and in `moeflow train`'s preflight), so
a bad option is reported as `moeflow train: error: ...` naming the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from moeflow.moe.errors import ConfigError
from moeflow.moe.model import ModelConfig

from .optim import train_state_bytes
from .runtime import resolve_device


@dataclass
class TrainerConfig:
    steps: int
    grad_accum: int
    eval_every: int
    eval_batches: int
    log_every: int
    ckpt_every: int
    keep_checkpoints: int
    device: str
    precision: str
    seed: int
    progress: bool
    compile: bool
    compile_scope: str = "model"
    activation_checkpointing: str = "none"
    activation_checkpointing_every: int = 1
    async_checkpoint: bool = False
    verify_checkpoint: bool = True
    trust_checkpoint: bool = False
    allow_config_change: bool = False
    on_nonfinite: str = "stop"
    collective_timeout: float = 600.0
    profile: bool = False


def resolve_experts_impl(impl: str, device: torch.device) -> str:
    from moeflow.moe.experts import IMPLEMENTATIONS

    if impl == "auto":
        return "triton" if device.type == "cuda" and "triton" in IMPLEMENTATIONS else "torch"
    if impl not in IMPLEMENTATIONS:
        raise ConfigError(
            f"experts.impl={impl!r} is not available here; available: auto, {', '.join(sorted(IMPLEMENTATIONS))}"
        )
    return impl


def _container(node) -> dict:
    try:
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        key = e.full_key
        raise ConfigError(f"{key} is required here but was not set; pass {key}=... on the command line") from None


def parallel_config(cfg: DictConfig):
    """The typed `parallel.*` group (`moeflow.parallel.mesh.ParallelConfig`)."""
    from moeflow.parallel.mesh import ParallelConfig

    return ParallelConfig.from_mapping(_container(cfg.parallel))


def model_config(cfg: DictConfig, device: torch.device | None = None) -> ModelConfig:
    device = device or resolve_device(cfg.trainer.device)
    fields = _container(cfg.model)
    fields["gate"] = _container(cfg.gate)
    fields["experts_impl"] = resolve_experts_impl(cfg.experts.impl, device)
    if not isinstance(cfg.experts.gather_rows, bool):
        raise ConfigError(f"experts.gather_rows={cfg.experts.gather_rows!r} must be true or false")
    fields["experts_gather_rows"] = cfg.experts.gather_rows
    try:
        model_cfg = ModelConfig(**fields)
        with torch.device("meta"):  # builds every module (gates check their options) at no cost
            from moeflow.moe.model import Transformer

            Transformer(model_cfg)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    return model_cfg


def trainer_config(cfg: DictConfig) -> TrainerConfig:
    try:
        trainer_cfg = TrainerConfig(**_container(cfg.trainer))
    except TypeError as e:
        raise ConfigError(f"trainer: {e}") from None
    for name in ("steps", "grad_accum", "eval_batches", "log_every"):
        if not isinstance(getattr(trainer_cfg, name), int) or getattr(trainer_cfg, name) < 1:
            raise ConfigError(f"trainer.{name} must be a positive integer, got {getattr(trainer_cfg, name)!r}")
    if trainer_cfg.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"trainer.precision={trainer_cfg.precision!r} is unknown; use auto, bf16 or fp32")
    return trainer_cfg


def check_data(cfg: DictConfig, model_cfg: ModelConfig) -> None:
    d = _container(cfg.data)
    if d["seq_len"] > model_cfg.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d['seq_len']} exceeds model.max_seq_len={model_cfg.max_seq_len}; lower data.seq_len or raise model.max_seq_len"
        )
    if d.get("mix"):
        if d.get("source") != "memmap":
            raise ConfigError("data.mix needs data=memmap (sets written by `moeflow data prepare`)")
        for i, entry in enumerate(d["mix"]):
            path = entry.get("path") if isinstance(entry, dict) else None
            if not path or not Path(str(path)).expanduser().is_file():
                raise ConfigError(f"data.mix[{i}] needs an existing path (a prepared train.bin), got {entry!r}")
    elif d.get("source") == "memmap" and not d.get("path"):
        raise ConfigError(
            "data=memmap needs data.path=.../train.bin (a token file) or data.mix=[{path: ..., weight: ...}, ...]"
        )
    elif d.get("source") in ("text", "memmap"):
        p = Path(str(d["path"])).expanduser()
        if not p.exists():
            raise ConfigError(
                f"data.path={d['path']} does not exist; pass an existing {'file or folder' if d['source'] == 'text' else '.bin file'}"
            )
        if p.is_file() and p.stat().st_size == 0:
            raise ConfigError(f"data.path={d['path']} is empty; pass a file with data in it")
    if d.get("source") != "memmap" and model_cfg.vocab_size < 256:
        raise ConfigError(f"byte-level text needs model.vocab_size >= 256, got {model_cfg.vocab_size}")


def check_compile(cfg: DictConfig, trainer_cfg: TrainerConfig) -> None:
    """trainer.compile is engine=torch's; a scope without it would be silently ignored."""
    from .engines import engine_name

    if trainer_cfg.compile and engine_name(cfg) != "torch":
        raise ConfigError(
            f"trainer.compile=true needs engine=torch (engine={engine_name(cfg)} runs its modules uncompiled); drop it"
        )
    if trainer_cfg.compile_scope != "model" and not trainer_cfg.compile:
        raise ConfigError(
            f"trainer.compile_scope={trainer_cfg.compile_scope} does nothing without trainer.compile=true; add it or drop the scope"
        )


def _whole_tensors_on_torch(cfg: DictConfig, unsharded: str) -> str | None:
    """What moeflow's own AdamW kernel needs and this config lacks: engine=torch, then unsharded
    parameters (`unsharded` says so for the option asking); None when both hold."""
    from .engines import engine_name

    return "engine=torch" if engine_name(cfg) != "torch" else unsharded if shards_parameters(cfg) else None


def check_optim(cfg: DictConfig, trainer_cfg: TrainerConfig | None = None) -> None:
    o = _container(cfg.optim)
    if o.get("master_weights") and trainer_cfg is not None:
        from .runtime import bf16_autocast

        use_bf16, _ = bf16_autocast(trainer_cfg, resolve_device(trainer_cfg.device))
        why = _whole_tensors_on_torch(cfg, "one process (FSDP2 keeps its own fp32 shards)") or (
            "bf16 (trainer.precision=bf16, or auto on a GPU)"
            if not use_bf16
            else "trainer.grad_accum=1 (bf16 gradients would be summed in bf16)"
            if trainer_cfg.grad_accum != 1
            else None
        )
        if why:
            drop = (
                "drop them (optim.master_weights=false optim.master_remainders=false)"
                if o.get("master_remainders")
                else "drop it (optim.master_weights=false)"
            )
            raise ConfigError(f"optim.master_weights=true needs {why}; {drop} or change that setting")
    if o.get("master_remainders") and not o.get("master_weights"):
        raise ConfigError(
            "optim.master_remainders=true keeps part of the master weights, so it needs optim.master_weights=true; "
            "add it or drop optim.master_remainders"
        )
    if o.get("moments_dtype", "float32") != "float32" and trainer_cfg is not None:
        why = _whole_tensors_on_torch(
            cfg, "one process and parallel.dispatcher=auto|local (its kernel steps whole tensors, not FSDP2's shards)"
        )
        if why:
            raise ConfigError(
                f"optim.moments_dtype={o['moments_dtype']} needs {why}; use optim.moments_dtype=float32 or change that setting"
            )
    if o.get("name") != "adamw":
        raise ConfigError(f"optim.name={o.get('name')!r} is unknown; use optim=adamw")
    if not o["lr"] > 0 or o["min_lr"] < 0 or o["min_lr"] > o["lr"]:
        raise ConfigError(
            f"need 0 <= optim.min_lr <= optim.lr and optim.lr > 0 (got lr={o['lr']}, min_lr={o['min_lr']})"
        )
    if o["schedule"] not in ("cosine", "constant"):
        raise ConfigError(f"optim.schedule={o['schedule']!r} is unknown; use cosine or constant")


def train_state_per_rank(cfg: DictConfig, model_cfg: ModelConfig, device: torch.device) -> tuple[float, int]:
    """Bytes of weights, gradients and AdamW moments one rank holds (engine=torch, FSDP's even split
    on a GPU), and over how many ranks the state is spread."""
    from moeflow.moe.param_count import param_counts

    total, _ = param_counts(model_cfg)
    world = launch_world(cfg) if device.type == "cuda" else 1
    return train_state_bytes(cfg.optim) * total / world, world


def bf16_moments_would_help(cfg: DictConfig) -> bool:
    """Whether `optim.moments_dtype=bfloat16` is an option this run could still take."""
    from .engines import engine_name

    return (
        engine_name(cfg) == "torch"
        and cfg.optim.get("moments_dtype", "float32") == "float32"
        and not shards_parameters(cfg)
    )


def check_memory(cfg: DictConfig, model_cfg: ModelConfig, device: torch.device) -> None:
    """Refuse, before anything is allocated, a model whose weights, gradients and AdamW moments alone
    cannot fit: on a GPU, 16 B per parameter (12 with bf16 moments) spread over every rank (FSDP's
    best case); on the CPU, all of it in this machine's memory. Activations come on top, so this only
    refuses certain failures (`launch/out_of_memory.py` says the rest in one line when it happens)."""
    from .engines import engine_name

    if engine_name(cfg) != "torch":  # DeepSpeed and megatron have their own offload and sharding
        return
    from moeflow.moe.param_count import param_counts

    total, _ = param_counts(model_cfg)
    need, world = train_state_per_rank(cfg, model_cfg, device)
    if device.type == "cuda":
        have, where = (
            torch.cuda.get_device_properties(device.index or 0).total_memory,
            f"one GPU's {{:.0f}} GiB, with {world} rank(s) sharing the state",
        )
    else:
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return
        where = "this machine's {:.0f} GiB of memory"
    if need > have:
        small = train_state_bytes({**_container(cfg.optim), "moments_dtype": "bfloat16"}) * total / world
        hint = (
            f" (optim.moments_dtype=bfloat16 needs {small / 2**30:,.0f} GiB)"
            if bf16_moments_would_help(cfg) and small <= have
            else ""
        )
        raise ConfigError(
            f"the model has {total / 1e9:.2f}B parameters (model.num_experts={model_cfg.num_experts}, model.d_ff={model_cfg.d_ff}, "
            f"model.n_layers={model_cfg.n_layers}): its weights, gradients and AdamW moments alone take {need / 2**30:,.0f} GiB per rank, "
            f"more than {where.format(have / 2**30)}; use fewer or smaller experts, or more ranks{hint}"
        )


def shards_parameters(cfg: DictConfig) -> bool:
    """Whether engine=torch will hold FSDP2-sharded (DTensor) parameters: several processes, or one
    process whose named transport (parallel.dispatcher) runs over a group of one rank."""
    return launch_world(cfg) > 1 or runs_one_rank_group(cfg)


def runs_one_rank_group(cfg: DictConfig) -> bool:
    """A transport named with one process (parallel.dispatcher=capacity, ...) runs over a group of one rank."""
    return parallel_config(cfg).dispatcher not in ("auto", "local")


def launch_world(cfg: DictConfig) -> int:
    """How many training processes this config runs on: torchrun's (or Slurm's, Ray's) WORLD_SIZE once
    launched; before that, what the chosen launcher will start."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    launcher = cfg.get("launcher") or {}
    name = launcher.get("name", "none")
    if name == "local":
        return int(launcher.get("nproc", 1)) * int(launcher.get("nnodes", 1))
    if name == "slurm":
        return int(launcher.get("nodes", 1)) * int(launcher.get("nproc_per_node", 1))
    if name == "ray":
        return int(launcher.get("num_workers", 1))
    return 1


def check_parallel(cfg: DictConfig, model_cfg: ModelConfig) -> None:
    """The mesh must fit the world and the model (engine=torch: FSDP2 + EP on one mesh; the other
    engines: EP over consecutive ranks of the world, their own data parallelism)."""
    from moeflow.parallel.mesh import check_model_split

    from .engines import engine_name

    p = parallel_config(cfg)
    world = launch_world(cfg)
    check_model_split(p.ep, p.tp, model_cfg.num_experts, model_cfg.n_heads, model_cfg.kv_heads)
    dims = p.dims(world)
    ep = dims.ep
    if dims.cp > 1:
        check_context_parallel(cfg, model_cfg, dims.cp)
    if dims.pp > 1:
        check_pipeline_parallel(cfg, model_cfg, p)
    if engine_name(cfg) == "torch":
        if dims.tp > 1:
            raise ConfigError(
                f"parallel.tp={dims.tp}: engine=torch does not split attention and MLPs over tensor-parallel ranks yet; "
                f"use parallel.tp=1 (shard with parallel.dp_shard and parallel.ep), or engine=megatron (megatron-core's tensor parallelism) with parallel.tp={dims.tp}"
            )
    from moeflow.parallel.dispatchers import check_options

    opts = p.dispatch()  # overlap_chunks' type and range: schema.py
    check_options(opts, resolve_device(cfg.trainer.device).type, ep=ep)
    if opts.name not in ("auto", "local", "alltoall") and engine_name(cfg) != "torch":
        raise ConfigError(
            f"parallel.dispatcher={opts.name} runs with engine=torch only; engine={engine_name(cfg)} takes parallel.dispatcher=auto or alltoall"
        )
    if opts.name == "local" and ep > 1:
        raise ConfigError(
            f"parallel.dispatcher=local keeps every expert on its rank, but parallel.ep={ep} shards them; pick a transport (alltoall, capacity, symm_mem) or parallel.ep=1"
        )
    if opts.name == "symm_mem" and cfg.experts.impl == "torch":
        raise ConfigError(
            "parallel.dispatcher=symm_mem lands tokens in worst-case buffers that only the Triton experts skip cheaply; use experts.impl=triton (or auto) or parallel.dispatcher=alltoall"
        )


def check_context_parallel(cfg: DictConfig, model_cfg: ModelConfig, cp: int) -> None:
    """parallel.cp > 1: what context parallelism cannot run yet, refused before any work."""
    from moeflow.parallel.context_parallel import check_sequence

    from .engines import engine_name

    if engine_name(cfg) != "torch":
        raise ConfigError(
            f"parallel.cp={cp}: engine={engine_name(cfg)} has no context parallelism here; use engine=torch "
            "(or parallel.cp=1 and megatron-core's own context_parallel_size outside moeflow)"
        )
    check_sequence(int(cfg.data.seq_len), cp)
    if cfg.trainer.activation_checkpointing == "selective":
        raise ConfigError(
            f"trainer.activation_checkpointing=selective with parallel.cp={cp}: its policy would keep every "
            "attention block's scores (S/cp x S/cp per head) that context parallelism recomputes; use "
            "trainer.activation_checkpointing=full or none"
        )
    gate = model_cfg.gate
    if not gate.get("dropless", True) and gate.get("drop_policy", "score") == "position":
        raise ConfigError(
            f"gate.drop_policy=position with parallel.cp={cp}: capacity drops by a token's place in the global "
            "batch, which a rank's sequence shards do not keep in order; use gate.drop_policy=score (or dropless)"
        )


def check_pipeline_parallel(cfg: DictConfig, model_cfg: ModelConfig, p) -> None:
    """parallel.pp > 1: what pipelining cannot run, refused before any work (`parallel/pipeline.py`)."""
    import torch

    from moeflow.parallel.pipeline import check_microbatches, model_split, schedule_kind

    from .engines import engine_name

    pp = p.pp
    engine = engine_name(cfg)
    if engine != "torch":
        offer = {
            "deepspeed": "DeepSpeed's pipeline engine (deepspeed.pipe.PipelineModule) takes a sequential model, which moeflow does not build",
            "megatron": "megatron-core pipelines through its own pipeline_model_parallel_size, which moeflow's megatron engine does not set up",
        }.get(engine, "")
        raise ConfigError(
            f"parallel.pp={pp}: engine={engine} has no pipeline parallelism here ({offer}); use engine=torch with parallel.pp={pp}"
        )
    kind = schedule_kind(p.pp_schedule)
    if kind.zero_bubble:
        raise ConfigError(
            f"parallel.pp_schedule={p.pp_schedule}: torch's zero-bubble schedules split each backward into input and weight "
            "passes, and on FSDP2-sharded MoE stages they leave some weight gradients unset (checked on gloo, torch 2.13); "
            "use parallel.pp_schedule=1f1b or interleaved_1f1b"
        )
    if model_cfg.gate.get("name") == "hash":
        raise ConfigError(
            f"gate=hash with parallel.pp={pp}: a hash gate routes by token id, which stages after the first do not see; "
            "use another gate or parallel.pp=1"
        )
    if model_cfg.tie_embeddings:
        raise ConfigError(
            f"model.tie_embeddings=true with parallel.pp={pp}: the embedding (first stage) and the LM head (last stage) "
            "would be one tensor on two stages; use model.tie_embeddings=false or parallel.pp=1"
        )
    with torch.device("meta"):
        from moeflow.moe.model import Transformer

        model = Transformer(model_cfg)

    model_split(model, pp * kind.stages_per_rank, p.pp_layers_per_stage)  # more stages than blocks, a bad split
    check_microbatches(p.pp_microbatches, int(cfg.data.batch_size), pp, p.pp_schedule)


_VALIDATED: dict[str, tuple[ModelConfig, TrainerConfig]] = {}  # this process's checked configs, by their YAML


def global_batch_accum(cfg: DictConfig, grad_accum: int, world: int) -> tuple[int, int] | None:
    """(accumulation steps, data-parallel ranks) that data.global_batch_size takes on `world` ranks, or
    None without one; refused in one line where the global batch cannot be met. `validate` calls it with
    the ranks the launch will start (before any run dir exists), the trainer again with its group's."""
    g = cfg.data.get("global_batch_size")
    if g is None:
        return None
    tp, cp, pp = int(cfg.parallel.tp), int(cfg.parallel.cp), int(cfg.parallel.get("pp", 1))
    dp = max(1, world // (pp * tp * cp))  # the ranks of a TP or CP group, and a pipeline's stages, read one batch
    per = int(cfg.data.batch_size) * dp
    if g % per:
        raise ConfigError(
            f"data.global_batch_size={g} is not a multiple of data.batch_size={cfg.data.batch_size} x {dp} data-parallel ranks = {per}; "
            f"choose a global batch that is, or another data.batch_size"
        )
    if grad_accum not in (1, g // per):
        raise ConfigError(
            f"trainer.grad_accum={grad_accum} and data.global_batch_size={g} disagree ({g // per} on {dp} data-parallel ranks); set one of them"
        )
    if g // per > 1 and cfg.optim.get("master_weights"):  # check_optim saw grad_accum=1: the global batch sets it
        raise ConfigError(
            f"optim.master_weights=true needs trainer.grad_accum=1 (bf16 gradients would be summed in bf16), but "
            f"data.global_batch_size={g} takes {g // per} micro-batches of data.batch_size={cfg.data.batch_size} on {dp} "
            f"data-parallel ranks; set data.batch_size={g // dp} or drop optim.master_weights"
        )
    return g // per, dp


def validate(cfg: DictConfig, schema_checked: bool = False) -> tuple[ModelConfig, TrainerConfig]:
    """Every check of a training config, once per process: `moeflow train` checks in its preflight and
    the run that follows gets the same answer without checking (or building the model on meta) again.
    `schema_checked`: the caller has run schema.check already (the preflight does, before torch)."""
    import copy

    key = f"{os.environ.get('WORLD_SIZE', '1')}\n{OmegaConf.to_yaml(cfg)}"
    if key not in _VALIDATED:
        _VALIDATED.clear()  # one config at a time is ever reused
        _VALIDATED[key] = _validate(cfg, schema_checked)
    return copy.deepcopy(_VALIDATED[key])  # the caller may adjust its copy (trainer.grad_accum)


def _validate(cfg: DictConfig, schema_checked: bool) -> tuple[ModelConfig, TrainerConfig]:
    from . import schema

    if not schema_checked:
        schema.check(cfg)  # types and ranges of every key first
    from .config_groups import check_launcher_keys

    check_launcher_keys(cfg)  # also for each job of a `-m` sweep, which runs in-process without the preflight
    trainer_cfg = trainer_config(cfg)
    model_cfg = model_config(cfg, resolve_device(trainer_cfg.device))
    check_data(cfg, model_cfg)
    check_optim(cfg, trainer_cfg)
    check_compile(cfg, trainer_cfg)
    from .divergence import check_policy
    from .engines import check_engine, engine_name

    check_engine(cfg, model_cfg, resolve_device(trainer_cfg.device))
    check_policy(trainer_cfg.on_nonfinite, engine_name(cfg))
    check_parallel(cfg, model_cfg)
    # the global batch on the ranks this launch starts (the trainer derives grad_accum again from its group)
    global_batch_accum(cfg, trainer_cfg.grad_accum, launch_world(cfg))
    check_memory(cfg, model_cfg, resolve_device(trainer_cfg.device))
    return model_cfg, trainer_cfg
