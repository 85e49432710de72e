"""Pipeline parallelism, the run side: this rank's stages, sharded, under a torch.distributed.pipelining schedule.

`build_pipeline` splits a meta-device `Transformer` (`pipeline.model_split`), keeps this rank's
stages, gives each the stage-local FSDP2 + EP of `parallelize` (each stage is an FSDP root, as
torchtitan does), materialises them and wraps them in `PipelineStage`s over the mesh's "pp" group.
`Pipeline.step` runs one schedule step (every micro-batch's forward and backward) and returns
the batch's mean loss and aux loss on every rank of the pipeline, not only on the last stage's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from moeflow.moe.errors import ConfigError

from .mesh import ParallelMesh
from .parallelize import ShardingOptions, parallelize
from .pipeline import (
    StageModel,
    boundary_meta,
    model_split,
    predicted_bubble,
    schedule_kind,
    stage_models,
    stage_params,
    stages_of_rank,
)
from .plan import ParallelPlan


@dataclass
class Pipeline:
    """This rank's part of the pipeline and the schedule that runs it."""

    model: StageModel  # the union of this rank's stages: what the optimizer and checkpoints see
    chunks: list[StageModel]  # one per stage this rank runs, in stage order
    stage_ids: list[int]
    split: list[list[int]]  # every stage's blocks
    stage_params: list[int]  # every stage's parameter count (the whole model's, before sharding)
    plan: ParallelPlan
    schedule: object
    eval_schedule: object
    schedule_name: str
    microbatches: int
    pp_group: object
    last_stage_rank: int  # the global rank of this pipeline's last stage (it computes the loss)
    _losses: list = field(default_factory=list)
    _scale: float = 1.0
    _timings: dict = field(default_factory=dict)  # stage -> [(start, end)] of its forwards since the last report

    def time_forwards(self) -> None:
        """Record each stage's forward time (CUDA events on a GPU: no host sync until `stage_report`)."""
        import time

        cuda = next(self.model.parameters()).is_cuda

        def stamp():
            if cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                return event
            return time.perf_counter()

        for stage, chunk in zip(self.stage_ids, self.chunks):
            pending = []

            def before(module, args, pending=pending):
                if module.training:  # training forwards only: evaluation's run without autograd
                    pending.append(stamp())

            def after(module, args, output, pending=pending, stage=stage):
                if module.training:
                    self._timings.setdefault(stage, []).append((pending.pop(), stamp()))

            chunk.register_forward_pre_hook(before)
            chunk.register_forward_hook(after)

    def stage_report(self) -> str:
        """Each stage's mean forward time per micro-batch since the last report, and each pipeline rank's
        peak memory (a GPU's): what shows an unbalanced split. Collective over the pipeline group."""
        device = next(self.model.parameters()).device
        n = len(self.split)
        ms = torch.zeros(n, dtype=torch.float64, device=device)
        for stage, pairs in self._timings.items():
            if pairs:
                if device.type == "cuda":
                    pairs[-1][1].synchronize()
                    total = sum(a.elapsed_time(b) for a, b in pairs)
                else:
                    total = 1e3 * sum(b - a for a, b in pairs)
                ms[stage] = total / len(pairs)
        self._timings.clear()
        pp = dist.get_world_size(self.pp_group)
        peak = torch.zeros(pp, dtype=torch.float64, device=device)
        if device.type == "cuda":
            peak[dist.get_rank(self.pp_group)] = torch.cuda.max_memory_allocated(device) / 2**30
        both = torch.cat([ms, peak])
        dist.all_reduce(both, group=self.pp_group)
        line = "stage forward ms per micro-batch: " + ", ".join(
            f"{s}: {v:.2f}" for s, v in enumerate(both[:n].tolist())
        )
        if device.type == "cuda":
            line += "; peak memory per pipeline rank: " + ", ".join(
                f"{r}: {v:.1f} GiB" for r, v in enumerate(both[n:].tolist())
            )
        return line

    @property
    def bubble(self) -> float:
        return predicted_bubble(self.schedule_name, len(self.split) // len(self.stage_ids), self.microbatches)

    def describe(self) -> str:
        kind = schedule_kind(self.schedule_name)
        per_rank = f", {kind.stages_per_rank} stages per rank" if kind.stages_per_rank > 1 else ""
        stages = "; ".join(
            f"stage {s}: blocks {b[0]}-{b[-1]}"
            + (" + embedding" if s == 0 else "")
            + (" + head" if s == len(self.split) - 1 else "")
            + f", {p / 1e6:.2f}M params"
            for s, (b, p) in enumerate(zip(self.split, self.stage_params))
        )
        return (
            f"pipeline: {len(self.split)} stages{per_rank}, schedule {self.schedule_name}, "
            f"{self.microbatches} micro-batches per step, predicted bubble {100 * self.bubble:.1f}%; {stages} "
            f"(the log's routing statistics are the first stage's MoE layers)"
        )

    def _loss(self, loss_fn):
        last = next((c for c, s in zip(self.chunks, self.stage_ids) if s == len(self.split) - 1), None)

        def loss(output, target):
            value = loss_fn(output, target)
            self._losses.append(value.detach().float())
            total = value * self._scale
            aux, last.last_aux = last.last_aux, None  # the last stage's own aux losses (its forward just ran)
            if aux is not None and aux.requires_grad and torch.is_grad_enabled():
                total = total + aux * self._scale
            return total

        return loss

    def step(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of every micro-batch of (x, y) (this data-parallel rank's batch; under
        parallel.cp, this rank's shard of its sequences: `plan.sequence_shard.shard`), each
        micro-batch's loss and aux losses scaled by `scale / microbatches`; returns (mean loss, mean aux
        loss of all stages), the same on every rank of the pipeline."""
        self._scale = scale / self.microbatches
        for chunk in self.chunks:
            chunk.aux_grad_scale = self._scale
            chunk.aux_seen = torch.zeros((), device=x.device)
        self._run(self.schedule.step, x, y)
        return self._loss_everywhere(x.device), self._aux_everywhere(x.device)

    def _eval_run(self, *args, **kwargs):
        return self.eval_schedule.eval(*args, **kwargs)

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of (x, y) through the schedule's forward only, on every rank of the pipeline. Its own
        stages and schedule: torch 2.11 fixes at a schedule's first call whether its receive buffers take
        gradients, so an evaluation before the first training step would leave training without them."""
        self._run(self._eval_run, x, y)
        return self._loss_everywhere(x.device)

    def _run(self, run, x, y) -> None:
        self._losses = []
        args = (x.contiguous(),) if 0 in self.stage_ids else ()  # (torch 2.11 checks the strides of micro-batches)
        target = y.contiguous() if len(self.split) - 1 in self.stage_ids else None
        run(*args, target=target, return_outputs=False)  # the losses are kept; no logits held to the step's end

    def _loss_everywhere(self, device) -> torch.Tensor:
        mine = self._losses[-self.microbatches :]  # (a schedule may call the loss once more to infer shapes)
        loss = torch.stack(mine).mean() if len(self.split) - 1 in self.stage_ids else torch.zeros((), device=device)
        loss = loss.to(device)
        dist.broadcast(loss, src=self.last_stage_rank, group=self.pp_group)
        return loss

    def _aux_everywhere(self, device) -> torch.Tensor:
        aux = sum(chunk.aux_seen.to(device) for chunk in self.chunks) / self.microbatches
        dist.all_reduce(aux, group=self.pp_group)
        return aux


def build_pipeline(
    model: nn.Module,
    mesh: ParallelMesh,
    opts: ShardingOptions,
    schedule_name: str,
    microbatches: int,
    layers_per_stage,
    device: torch.device,
    loss_fn,
    micro_shape: tuple[int, int],
    logits_dtype: torch.dtype = torch.float32,
) -> Pipeline:
    """Split the meta-device `model`, shard and materialise this rank's stages, and build the schedule.
    `loss_fn(logits, targets)` is the mean loss of one micro-batch; `micro_shape` (sequences, tokens) is
    a micro-batch's as this rank holds it (under parallel.cp, its shard of every sequence): every
    step's batch must split into `microbatches` of it; `logits_dtype` is the last stage's compute dtype."""
    from torch.distributed.pipelining import PipelineStage, schedules

    kind = schedule_kind(schedule_name)
    pp = mesh.dims.pp
    n_stages = pp * kind.stages_per_rank
    split = model_split(model, n_stages, layers_per_stage)
    params = stage_params(model, split)
    stage_ids = stages_of_rank(mesh.pp_rank, pp, kind)
    chunks, union = stage_models(model, split, stage_ids)
    plans = [parallelize(chunk, mesh, opts) for chunk in chunks]
    plan = ParallelPlan(
        world=plans[0].world,
        ep=plans[0].ep,
        local_shards={k: v for p in plans for k, v in p.local_shards.items()},
        replicated_experts=tuple(e for p in plans for e in p.replicated_experts),
        replica_group=next((p.replica_group for p in plans if p.replica_group is not None), None),
        sequence_shard=plans[0].sequence_shard,  # parallel.cp: the same CP group for every stage of a rank
    )
    for chunk in chunks:
        chunk.to_empty(device=device)
    union.init_weights()  # every tensor from its own name's stream: the single-process model's values
    cfg = model.cfg

    def stages():
        out = []
        for chunk, s in zip(chunks, stage_ids):
            inputs, outputs = boundary_meta(s, n_stages, *micro_shape, cfg.d_model, cfg.vocab_size, logits_dtype)
            out.append(
                PipelineStage(chunk, s, n_stages, device, input_args=inputs, output_args=outputs, group=mesh.pp_group)
            )
        return out

    last_pp_rank = next(r for r in range(pp) if n_stages - 1 in stages_of_rank(r, pp, kind))
    pipe = Pipeline(
        model=union,
        chunks=chunks,
        stage_ids=stage_ids,
        split=split,
        stage_params=params,
        plan=plan,
        schedule=None,
        eval_schedule=None,
        schedule_name=schedule_name,
        microbatches=microbatches,
        pp_group=mesh.pp_group,
        last_stage_rank=dist.get_global_rank(mesh.pp_group, last_pp_rank),
    )
    cls = getattr(schedules, kind.torch_class)
    try:
        pipe.schedule, pipe.eval_schedule = (
            cls(
                mine[0] if kind.stages_per_rank == 1 else mine,
                microbatches,
                loss_fn=pipe._loss(loss_fn),
                scale_grads=False,  # the loss is scaled by the engine (1 / data-parallel ranks / micro-batches)
            )
            for mine in (stages(), stages())
        )
    except ValueError as e:  # the schedule's own rule on micro-batches, said in one line
        raise ConfigError(
            f"parallel.pp_schedule={schedule_name} with parallel.pp_microbatches={microbatches}: {e}"
        ) from None
    pipe.time_forwards()
    return pipe
