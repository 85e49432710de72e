"""engine=torch: the reference step (autocast forward, backward, clip, AdamW, schedule).

One process: the plain model. Under torchrun: the model is built on the meta device, given
expert parallelism and FSDP2 on the mesh of `parallel.*` (`moeflow.parallel.parallelize`),
then materialised shard by shard and initialised exactly as the single-process model would
be. The loss is divided by the number of data-parallel ranks (times the CP ranks that share each
sequence, under parallel.cp) and gradients are summed, so a
step equals the single-process step on the global batch. Checkpoints go through
`launch/resume.py`: sharded (torch.distributed.checkpoint), every rank writing its own shards,
loadable into any other layout.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from moeflow.moe.model import Transformer
from moeflow.parallel import checkpoint as sharded
from moeflow.parallel.activation_checkpointing import apply_activation_checkpointing
from moeflow.parallel.clip import clear_folded_clip, clip_grad_norm_
from moeflow.parallel.distributed import DistEnv
from moeflow.parallel.mesh import build_mesh
from moeflow.parallel.parallelize import ShardingOptions, materialize, parallelize
from moeflow.parallel.plan import reduce_replicated_expert_grads

from ..config import parallel_config, runs_one_rank_group
from ..divergence import MAX_SKIPS_IN_A_ROW, Diverged
from ..losses import lm_loss
from ..optim import build_optimizer, build_scheduler, masters_in_model, replay_schedule
from ..profiling import phase
from ..runtime import bf16_autocast, start_distributed
from .contract import MoeflowCheckpointEngine

log = logging.getLogger("moeflow.train")


def compiled_forward(model: torch.nn.Module, scope: str, pipelined: bool = False):
    """trainer.compile: the whole model as one torch.compile region (`trainer.compile_scope=model`), or
    each block compiled in place (`blocks`: torchtitan's regional compile; identical blocks can share
    one compiled graph, and parameter names stay the plain model's). Pipeline stages always compile
    by block (their stages hold blocks under the whole model's names)."""
    if scope == "blocks" or pipelined:
        blocks = model.blocks.values() if isinstance(model.blocks, torch.nn.ModuleDict) else model.blocks
        for block in blocks:
            block.compile()
        return model
    return torch.compile(model)


class TorchEngine(MoeflowCheckpointEngine):
    """The reference engine (the contract: `contract.Engine`); saves, rollbacks and closing are
    `MoeflowCheckpointEngine`'s."""

    name = "torch"

    start = staticmethod(
        lambda cfg, tc: start_distributed(
            tc,
            cfg.parallel.backend,
            single_rank_group=runs_one_rank_group(cfg),
        )
    )

    def __init__(self, cfg: DictConfig, model_cfg, trainer_cfg, env: DistEnv, device: torch.device, run_dir: Path):
        self.cfg, self.model_cfg, self.env, self.device, self.run_dir = cfg, model_cfg, env, device, run_dir
        self.grad_accum = trainer_cfg.grad_accum
        self.use_bf16, self.autocast = bf16_autocast(trainer_cfg, device)
        self.mesh = self.plan = self.pipeline = None
        self.data_parallel_group = None
        if dist.is_initialized():  # torchrun's world, or one rank that runs a named dispatcher
            p = parallel_config(cfg)
            dims = p.dims(env.world_size)
            dims.check_model(model_cfg.num_experts, model_cfg.n_heads, model_cfg.kv_heads)
            self.mesh = build_mesh(dims, device.type)
            with torch.device("meta"):  # no rank ever holds the whole model
                self.model = Transformer(model_cfg)
            self._checkpointing(trainer_cfg)
            opts = ShardingOptions(param_dtype=torch.bfloat16 if self.use_bf16 else None, dispatch=p.dispatch())
            if dims.pp > 1:  # this rank's stages of the model, each sharded over the stage's ranks
                self._counts = (self.model.num_params(), self.model.num_params(active_only=True))
                self.pipeline = self._pipeline(p, opts, cfg, device)
                self.model, self.plan = self.pipeline.model, self.pipeline.plan
                self.data_parallel_group = self.mesh.stage_group  # the stage's ranks see every batch shard
            else:
                self.plan = parallelize(self.model, self.mesh, opts)
                materialize(self.model, device)
            self.loss_scale = 1.0 / dims.grad_ranks  # gradients are summed over the data-parallel (and CP) ranks
            # a CP group reads one batch; every stage of a pipeline reads its data-parallel rank's
            self.data_parallel_rank = ((env.rank % dims.stage_world) // (dims.tp * dims.cp), dims.dp)
        else:  # also built on meta and materialised on the device: no host copy of the weights
            with torch.device("meta"):
                self.model = Transformer(model_cfg)
            materialize(self.model, device)
            self._checkpointing(trainer_cfg)
            self.loss_scale = 1.0
            self.data_parallel_rank = (0, 1)
        self.sequence_shard = self.plan.sequence_shard if self.plan is not None else None
        self.eval_model = (
            self.model if self.sequence_shard is None else WholeSequenceLogits(self.model, self.sequence_shard)
        )
        if self.pipeline is not None:
            self.eval_model = PipelineEval(self.pipeline, self.sequence_shard)
        self.skip_nonfinite, self.skipped, self.last_stepped = trainer_cfg.on_nonfinite == "skip_step", 0, 0
        self.last_step_skipped = False  # the loop does not count a skipped step's NaN as a divergence
        self.opt = build_optimizer(self.model, cfg.optim)
        self.sched = build_scheduler(self.opt, cfg.optim, trainer_cfg.steps)
        self.start_step = self.start_checkpoints(trainer_cfg)
        self.fwd = self.model
        if trainer_cfg.compile:
            self.fwd = compiled_forward(self.model, trainer_cfg.compile_scope, pipelined=self.pipeline is not None)

    def _pipeline(self, p, opts, cfg, device):
        """parallel.pp > 1: this rank's stages (`parallel.pipeline_schedule`), the loss being the trainer's."""
        from moeflow.parallel.pipeline import check_microbatches
        from moeflow.parallel.pipeline_schedule import build_pipeline

        batch, seq = int(cfg.data.batch_size), int(cfg.data.seq_len)
        microbatches = check_microbatches(p.pp_microbatches, batch, p.pp, p.pp_schedule)
        autocast = self.autocast
        pipe = build_pipeline(
            self.model,
            self.mesh,
            opts,
            p.pp_schedule,
            microbatches,
            p.pp_layers_per_stage,
            device,
            lm_loss,
            (batch // microbatches, seq // p.cp),
            torch.bfloat16 if self.use_bf16 else torch.float32,  # the LM head's output under autocast
        )
        for chunk in pipe.chunks:
            chunk.autocast = autocast
        return pipe

    def _checkpointing(self, trainer_cfg) -> None:
        n = apply_activation_checkpointing(
            self.model, trainer_cfg.activation_checkpointing, trainer_cfg.activation_checkpointing_every
        )
        if n:
            log.info(
                "activation checkpointing (%s) on %d of %d blocks",
                trainer_cfg.activation_checkpointing,
                n,
                len(self.model.blocks),
            )

    def describe(self) -> str:
        m = self.model
        total, active = self._counts if self.pipeline is not None else (m.num_params(), m.num_params(active_only=True))
        layout = f"; {self.mesh.dims.describe()}" if self.mesh is not None else ""
        if self.pipeline is not None:
            layout += f"; {self.pipeline.describe()}"
        return (
            f"model: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active), "
            f"device {self.device}, {'bf16' if self.use_bf16 else 'fp32'}, world {self.env.world_size}{layout}"
        )

    def _gradient_sync(self, last: bool):
        """FSDP reduces gradients on the last micro-batch of a step only."""
        if self.mesh is None or self.pipeline is not None:  # a pipeline schedule reduces at its own end
            return contextlib.nullcontext()
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def forward_backward(self, x, y, last: bool):
        if self.pipeline is not None:  # every micro-batch's forward and backward, through the schedule
            if self.sequence_shard is not None:
                x, y = self.sequence_shard.shard(x), self.sequence_shard.shard(y)
            loss, aux = self.pipeline.step(x, y, self.loss_scale / self.grad_accum)
            phase("forward")  # (one phase: a schedule interleaves them)
            phase("backward")
            return loss, aux
        if self.sequence_shard is not None:  # context parallelism: this rank's shard of every sequence
            x, y = self.sequence_shard.shard(x), self.sequence_shard.shard(y)
        with self._gradient_sync(last):
            with self.autocast():
                loss = lm_loss(self.fwd(x), y)
                aux = self.model.aux_loss().to(loss.device)
            phase("forward")  # phase times of `moeflow bench train`; a no-op otherwise
            ((loss + aux) * (self.loss_scale / self.grad_accum)).backward()
            phase("backward")
        return loss, aux

    def stage_report(self) -> str | None:
        """Under parallel.pp: each stage's forward time and each pipeline rank's peak memory (collective:
        every rank calls it at a log step); None otherwise."""
        return self.pipeline.stage_report() if self.pipeline is not None else None

    def optimizer_step(self) -> torch.Tensor:
        """Clip, AdamW, schedule; the pre-clip gradient norm (a device tensor: the loop reads it when it logs)."""
        reduce_replicated_expert_grads(self.plan)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        norm = clip_grad_norm_(  # fused AdamW applies the factor as it reads each gradient
            list(self.model.parameters()), clip, optimizer=self.opt, world=self.plan.world if self.plan else None
        )
        self.last_step_skipped = self.skip_nonfinite and not bool(
            torch.isfinite(norm)
        )  # on_nonfinite=skip_step: a host read per step
        if self.last_step_skipped:
            self.skipped += 1
            log.warning("skipped the optimizer step: gradient norm %s (%d skipped so far)", float(norm), self.skipped)
            if self.skipped_in_a_row() > MAX_SKIPS_IN_A_ROW:
                raise Diverged(
                    f"{self.skipped_in_a_row()} optimizer steps in a row had a non-finite gradient norm; lower optim.lr"
                )
        else:
            self.opt.step()
            self.sched.step()
            self.last_stepped = self.skipped
        clear_folded_clip(self.opt)
        self.opt.zero_grad(set_to_none=True)
        return norm

    def skipped_in_a_row(self) -> int:
        return self.skipped - self.last_stepped

    # -- checkpoints (launch/resume.py) -------------------------------------------------
    def checkpoint_state(self, with_optimizer: bool = True) -> dict:
        with masters_in_model(self.opt):  # optim.master_weights: the fp32 weights, not the bf16 copies
            return sharded.model_and_optimizer_state(self.model, self.opt if with_optimizer else None)

    def schedule_state(self) -> dict:
        return {"scheduler": self.sched.state_dict()}

    def load_checkpoint_state(self, state: dict | None, trainer_state: dict | None) -> None:
        if state is not None:
            with masters_in_model(self.opt):
                sharded.apply_model_and_optimizer_state(self.model, self.opt if "optim" in state else None, state)
        if trainer_state is None:
            return
        saved = trainer_state.get("scheduler")
        if saved is not None and len(saved.get("base_lrs", ())) == len(self.opt.param_groups):
            self.sched.load_state_dict(saved)
        else:  # none saved, or saved with another grouping of the parameters (another engine or mesh): the same schedule at that step
            replay_schedule(self.sched, int(trainer_state["step"]))

    @torch.no_grad()
    def load_full_weights(self, weights: dict) -> None:
        """Consolidated weights into this rank's parameters (their shards, when sharded)."""
        from moeflow.moe.init import assign_full

        with masters_in_model(self.opt):  # a weights-only start sets the fp32 weights (the copies follow)
            params = dict(self.model.named_parameters())
            buffers = dict(self.model.named_buffers())
            for name, full in weights.items():
                target = params.get(name, buffers.get(name))
                if target is not None:
                    assign_full(target, full.to(device=_local(target).device, dtype=target.dtype))


class PipelineEval(torch.nn.Module):
    """Evaluation of a pipelined model: the loss of a batch through the schedule's forward only
    (`batch_loss`, which `train.evaluate` asks for), on every rank of the pipeline."""

    def __init__(self, pipeline, sequence_shard=None):
        super().__init__()
        self.model, self.pipeline, self.shard = pipeline.model, pipeline, sequence_shard

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "a pipelined model's logits exist on its last stage only: evaluate through batch_loss, or generate "
            "from its checkpoint in one process (moeflow generate RUN)"
        )

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.shard is not None:  # parallel.cp: this rank's shard of every sequence (the loss: its tokens' mean)
            x, y = self.shard.shard(x), self.shard.shard(y)
        return self.pipeline.eval_loss(x, y)


class WholeSequenceLogits(torch.nn.Module):
    """Under context parallelism, evaluation and generation see whole sequences: the model runs on this
    rank's shard and the logits of the CP group's shards are gathered back into sequence order."""

    def __init__(self, model: torch.nn.Module, shard):
        super().__init__()
        self.model, self.shard = model, shard

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        from moeflow.parallel.context_parallel import gather_sequence

        return gather_sequence(self.model(self.shard.shard(tokens_BS)), self.shard)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t
