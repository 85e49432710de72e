"""One mesh from config: pipeline x data-parallel replicate x shard x context-parallel x tensor-parallel, with EP folded in.

The world is a grid of `pp x dp_replicate x dp_shard x cp x tp` ranks (tp innermost: consecutive ranks,
inside a node first; pp outermost: a pipeline stage's ranks are consecutive, and only activations
cross between stages). Each pipeline stage holds some of the model's blocks (`pipeline.py`) and
is sharded over its own `dp_replicate x dp_shard x cp x tp` ranks exactly as a whole model is
with pp=1: everything below describes one stage. Dense parameters are sharded over `dp_shard x cp` (FSDP: the ranks of a CP
group hold different parts of the same sequences, so they shard the weights like data-parallel
ranks do, as torchtitan does), replicated over `dp_replicate` (HSDP when > 1) and split over `tp`.
The ranks of one CP group read the same batch and each keeps its shard of every sequence
(`context_parallel.py`).

Experts borrow their ranks from the same grid ("parallel folding", as torchtitan and
Megatron-Core do): inside one replica the `dp_shard x cp x tp` ranks are regrouped as
`efsdp x ep`, ep innermost. Expert weights are sharded over `ep` by expert (each EP rank holds
E/ep whole experts, tokens travel by all-to-all) and over `efsdp` by FSDP, the ranks that hold
the same experts. So ep need only divide `dp_shard x cp x tp` and the expert count.

    8 ranks, dp_shard=8, ep=4:    dense FSDP over all 8;  experts: efsdp=2 x ep=4
        rank:    0 1 2 3 | 4 5 6 7
        ep:      0 1 2 3 | 0 1 2 3     (experts 16e..16e+15 of 64 on ep rank e)
        efsdp:   0 0 0 0 | 1 1 1 1     (ranks 0 and 4 hold the same experts, FSDP-sharded)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from moeflow.moe.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of every parallel dimension, resolved against the world size and checked."""

    world: int
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the world leaves
    tp: int = 1
    ep: int = 1
    cp: int = 1
    pp: int = 1

    def __post_init__(self):
        for name in ("dp_replicate", "tp", "ep", "cp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"parallel.{name} must be a positive integer, got {value!r}")
        if (
            not isinstance(self.dp_shard, int)
            or isinstance(self.dp_shard, bool)
            or (self.dp_shard < 1 and self.dp_shard != -1)
        ):
            raise ConfigError(
                f"parallel.dp_shard must be a positive integer or -1 (the rest of the world), got {self.dp_shard!r}"
            )
        fixed = self.pp * self.dp_replicate * self.cp * self.tp
        grid = ("pp x " if self.pp > 1 else "") + (
            "dp_replicate x dp_shard x tp" if self.cp == 1 else "dp_replicate x dp_shard x cp x tp"
        )
        if self.dp_shard == -1:
            if self.world % fixed:
                named = f"parallel.dp_replicate={self.dp_replicate} x parallel.tp={self.tp}"
                if self.cp > 1:
                    named = f"parallel.dp_replicate={self.dp_replicate} x parallel.cp={self.cp} x parallel.tp={self.tp}"
                if self.pp > 1:
                    named = f"parallel.pp={self.pp} x {named}"
                fix = (
                    f"launch {fixed} processes (moeflow train launcher=local launcher.nproc={fixed}, or torchrun --nproc-per-node {fixed})"
                    if self.world == 1
                    else "pick sizes whose product divides it"
                )
                raise ConfigError(f"{named} does not divide the world size {self.world}; {fix}")
            object.__setattr__(self, "dp_shard", self.world // fixed)
        if self.dp_shard * fixed != self.world:
            sizes = (
                (f"parallel.pp={self.pp} x " if self.pp > 1 else "parallel.")
                + f"dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard}"
                + (f" x cp={self.cp}" if self.cp > 1 else "")
            )
            raise ConfigError(
                f"{sizes} x tp={self.tp} = {self.dp_shard * fixed} ranks, but the world has {self.world}; "
                f"make the product ({grid}) the world size (parallel.dp_shard=-1 takes the rest)"
            )
        inner = self.dp_shard * self.cp * self.tp
        if inner % self.ep:
            what = "dp_shard x tp" if self.cp == 1 else "dp_shard x cp x tp"
            hint = (
                f"launch with torchrun --nproc-per-node {self.ep} (or a multiple)"
                if self.world == 1
                else f"pick an ep that divides {what}"
            )
            raise ConfigError(
                f"parallel.ep={self.ep} does not divide {what} = {inner} (the ranks of one data-parallel replica); {hint}"
            )

    @property
    def stage_world(self) -> int:
        """Ranks of one pipeline stage (the whole world when pp = 1): what each stage is sharded over."""
        return self.world // self.pp

    @property
    def efsdp(self) -> int:
        """Ranks of one replica that hold the same experts (the experts' FSDP degree)."""
        return self.dp_shard * self.cp * self.tp // self.ep

    @property
    def dp(self) -> int:
        """Data-parallel degree: the number of different batch shards per step (a CP group reads one)."""
        return self.dp_replicate * self.dp_shard

    @property
    def grad_ranks(self) -> int:
        """Ranks whose gradients are summed into each dense gradient: the data-parallel ranks and, within
        each, the CP ranks holding the other parts of the same sequences (the loss is scaled by 1/this)."""
        return self.dp * self.cp

    def check_model(self, num_experts: int, n_heads: int, n_kv_heads: int) -> None:
        """Refuse sizes the model cannot be split by, naming the fix."""
        check_model_split(self.ep, self.tp, num_experts, n_heads, n_kv_heads)

    def describe(self) -> str:
        return (
            f"mesh: world {self.world} = "
            + (f"pp {self.pp} x " if self.pp > 1 else "")
            + f"dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard}"
            + (f" x cp {self.cp}" if self.cp > 1 else "")
            + f" x tp {self.tp}; "
            f"experts: dp_replicate {self.dp_replicate} x efsdp {self.efsdp} x ep {self.ep}"
        )


def check_model_split(ep, tp, num_experts: int, n_heads: int, n_kv_heads: int) -> None:
    """The model's side of a layout (before the world's side: a wrong ep is first a wrong split of experts)."""
    if isinstance(ep, int) and ep > 0 and num_experts % ep:
        raise ConfigError(
            f"parallel.ep={ep} does not divide model.num_experts={num_experts}; pick an ep that divides the number of experts"
        )
    for what, n in (("model.n_heads", n_heads), ("model.n_kv_heads", n_kv_heads)):
        if isinstance(tp, int) and tp > 0 and n % tp:
            raise ConfigError(
                f"parallel.tp={tp} does not divide {what}={n}; pick a tensor-parallel size that divides it"
            )


@dataclass(frozen=True)
class ParallelConfig:
    """The `parallel.*` group, typed, built once from the composed config (`launch.config.parallel_config`)
    and handed down. No defaults here: configs/parallel/default.yaml is their one home."""

    dp_replicate: int
    dp_shard: int
    tp: int
    cp: int
    ep: int
    pp: int
    pp_schedule: str
    pp_microbatches: int
    pp_layers_per_stage: object  # null, an int (blocks per stage) or a list (blocks of each stage)
    backend: str
    overlap_chunks: int
    overlap_shared: bool
    dispatcher: str
    capacity_factor: float
    capacity_warn_drop: float

    @classmethod
    def from_mapping(cls, node) -> ParallelConfig:
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in node]
        if missing:
            raise ConfigError(
                f"parallel.{missing[0]} is missing from the config; compose it from configs/ (the parallel group's YAML has every key)"
            )
        values = {n: node[n] for n in names}
        split = values["pp_layers_per_stage"]
        if split is not None and not isinstance(split, int):  # an OmegaConf ListConfig: a plain, hashable tuple
            values["pp_layers_per_stage"] = tuple(split)
        return cls(**values)

    def dims(self, world: int) -> ParallelDims:
        return ParallelDims(
            world=world,
            dp_replicate=self.dp_replicate,
            dp_shard=self.dp_shard,
            tp=self.tp,
            ep=self.ep,
            cp=self.cp,
            pp=self.pp,
        )

    def dispatch(self):
        from .dispatchers import DispatchOptions

        return DispatchOptions(
            name=self.dispatcher,
            overlap_chunks=self.overlap_chunks,
            overlap_shared=self.overlap_shared,
            capacity_factor=self.capacity_factor,
            capacity_warn_drop=self.capacity_warn_drop,
        )


@dataclass
class ParallelMesh:
    """The device meshes built from `ParallelDims` over the initialised process group.

    dense:   ("dp_replicate", "dp_shard", "tp"), or ("dp_replicate", "dp_shard", "cp", "tp") under parallel.cp > 1
    experts: ("dp_replicate", "efsdp", "ep")  (the same ranks, regrouped)
    Under parallel.pp > 1 each of them leads with "pp"; a slice by name (`dense["dp_shard"]`) is then this
    rank's stage's, and `pipeline` is ("pp", "stage"): the pipeline group and the stage's ranks.
    """

    dims: ParallelDims
    dense: object
    experts: object
    # parallel.cp > 1: ("dp_replicate", "dp_shard_cp", "tp"), the same ranks with dp_shard and cp merged (FSDP's)
    dense_cp_merged: object = None
    pipeline: object = None  # parallel.pp > 1: ("pp", "stage")

    @property
    def dense_fsdp(self):
        """The mesh dense parameters are FSDP-sharded (and HSDP-replicated) over: dp_shard, with cp folded in."""
        if self.dims.cp > 1:
            m = self.dense_cp_merged
            return m["dp_replicate", "dp_shard_cp"] if self.dims.dp_replicate > 1 else m["dp_shard_cp"]
        return self.dense["dp_replicate", "dp_shard"] if self.dims.dp_replicate > 1 else self.dense["dp_shard"]

    @property
    def cp_group(self):
        return self.dense.get_group("cp") if self.dims.cp > 1 else None

    @property
    def cp_rank(self) -> int:
        return self.dense.get_local_rank("cp") if self.dims.cp > 1 else 0

    @property
    def pp_group(self):
        """The ranks that run the stages of one pipeline (one per stage), or None without pp."""
        return self.pipeline.get_group("pp") if self.dims.pp > 1 else None

    @property
    def pp_rank(self) -> int:
        return self.pipeline.get_local_rank("pp") if self.dims.pp > 1 else 0

    @property
    def stage_group(self):
        """Every rank of this rank's pipeline stage (the world without pp): gates' statistics of the
        global batch are summed over it, since the other stages route through other layers."""
        import torch.distributed as dist

        return self.pipeline.get_group("stage") if self.dims.pp > 1 else dist.group.WORLD

    @property
    def expert_fsdp(self):
        return self.experts["dp_replicate", "efsdp"] if self.dims.dp_replicate > 1 else self.experts["efsdp"]

    @property
    def ep_mesh(self):
        return self.experts["ep"]

    @property
    def ep_group(self):
        return self.experts.get_group("ep")

    @property
    def ep_rank(self) -> int:
        return self.experts.get_local_rank("ep")

    @property
    def tp_mesh(self):
        return self.dense["tp"]


def build_mesh(dims: ParallelDims, device_type: str) -> ParallelMesh:
    """Every mesh over the default process group (every rank calls this, in the same order)."""
    import torch
    from torch.distributed.device_mesh import DeviceMesh

    ranks = torch.arange(dims.world)
    lead, lead_names = ((dims.pp,), ("pp",)) if dims.pp > 1 else ((), ())

    def mesh(shape, names):
        return DeviceMesh(device_type, ranks.view(*lead, *shape), mesh_dim_names=(*lead_names, *names))

    merged = None
    if dims.cp > 1:
        dense = mesh((dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp), ("dp_replicate", "dp_shard", "cp", "tp"))
        merged = mesh((dims.dp_replicate, dims.dp_shard * dims.cp, dims.tp), ("dp_replicate", "dp_shard_cp", "tp"))
    else:
        dense = mesh((dims.dp_replicate, dims.dp_shard, dims.tp), ("dp_replicate", "dp_shard", "tp"))
    experts = mesh((dims.dp_replicate, dims.efsdp, dims.ep), ("dp_replicate", "efsdp", "ep"))
    pipeline = (
        DeviceMesh(device_type, ranks.view(dims.pp, dims.stage_world), mesh_dim_names=("pp", "stage"))
        if dims.pp > 1
        else None
    )
    return ParallelMesh(dims=dims, dense=dense, experts=experts, dense_cp_merged=merged, pipeline=pipeline)
