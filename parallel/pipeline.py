"""Pipeline parallelism, the model side: the blocks split into stages, each stage a plain module.

`parallel.pp` stages hold consecutive blocks (the first also the embedding, the last the final
norm and LM head). A stage is a `StageModel`: the plain model's own submodules under their own
names (`blocks.3.attn.qkv.weight` stays that name), so a stage is sharded by `parallelize` like a
whole model, and its checkpoint shards are the same tensors a `pp=1` run reads (checkpoints
reshard between pipeline degrees).

The schedules (1F1B, interleaved, zero-bubble) are torch.distributed.pipelining's; they call a
loss function on the last stage's output only. The MoE layers of every stage add auxiliary
losses (balance, z, sequence losses): `CarryAuxLoss` attaches each stage's sum to the stage's
output, so its gradient flows in that stage's backward, as Megatron-Core's
`MoEAuxLossAutoScaler` does. Each micro-batch's aux loss is its own (computed over the global
micro-batch: the stage's ranks sum the routing statistics), as under gradient accumulation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from moeflow.moe.errors import ConfigError
from moeflow.moe.layer import MoELayer, moe_aux_loss, moe_layers


@dataclass(frozen=True)
class ScheduleKind:
    torch_class: str  # in torch.distributed.pipelining
    stages_per_rank: int
    layout: str  # "loop": rank r holds stages r, r+pp, ...; "v": rank r holds r and 2 pp - 1 - r
    zero_bubble: bool = False


SCHEDULES = {
    "gpipe": ScheduleKind("ScheduleGPipe", 1, "loop"),
    "1f1b": ScheduleKind("Schedule1F1B", 1, "loop"),
    "interleaved_1f1b": ScheduleKind("ScheduleInterleaved1F1B", 2, "loop"),
    "interleaved_zb": ScheduleKind("ScheduleInterleavedZeroBubble", 2, "loop", zero_bubble=True),
    "zbv": ScheduleKind("ScheduleZBVZeroBubble", 2, "v", zero_bubble=True),
}


def schedule_kind(name: str) -> ScheduleKind:
    if name not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule={name!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def stages_of_rank(pp_rank: int, pp: int, kind: ScheduleKind) -> list[int]:
    """The pipeline stages (indices into the model's split) that pipeline rank `pp_rank` runs."""
    if kind.layout == "v":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(kind.stages_per_rank)]


def resolved_microbatches(microbatches: int, pp: int, kind: ScheduleKind) -> int:
    """parallel.pp_microbatches, with -1 meaning one per stage of the pipeline."""
    return pp * kind.stages_per_rank if microbatches == -1 else microbatches


def check_microbatches(microbatches: int, batch_size: int, pp: int, kind_name: str) -> int:
    """The micro-batch count for a per-rank batch of `batch_size` sequences, refused in one line if the
    schedule cannot run it; returns it resolved."""
    kind = schedule_kind(kind_name)
    m = resolved_microbatches(microbatches, pp, kind)
    if m < 1:
        raise ConfigError(f"parallel.pp_microbatches={microbatches} must be a positive count or -1 (one per stage)")
    if batch_size % m:
        raise ConfigError(
            f"parallel.pp_microbatches={m} does not divide data.batch_size={batch_size} (sequences per data-parallel "
            f"rank and step); pick a micro-batch count that divides it, or raise data.batch_size to a multiple of {m}"
        )
    stages = pp * kind.stages_per_rank
    if kind_name in ("1f1b", "zbv") and m < stages:
        raise ConfigError(
            f"parallel.pp_schedule={kind_name} needs at least as many micro-batches as stages ({stages}), "
            f"got parallel.pp_microbatches={m}; raise it (and data.batch_size) or use parallel.pp_schedule=gpipe"
        )
    if kind.stages_per_rank > 1 and kind.layout == "loop":
        rounds = max(1, m // pp)
        if m % rounds:
            raise ConfigError(
                f"parallel.pp_schedule={kind_name} runs micro-batches in {rounds} equal rounds ({m} // parallel.pp={pp}): "
                f"parallel.pp_microbatches={m} is not divisible by {rounds}; use e.g. {pp} or {2 * pp}"
            )
    return m


def predicted_bubble(kind_name: str, pp: int, microbatches: int) -> float:
    """The idle fraction of a step the schedule leaves, with forward, input-backward and weight-backward
    taking equal time (the textbook model): 1F1B and GPipe (p-1)/(m+p-1); interleaving v stages per rank
    divides the bubble's length by v; zero-bubble schedules fill two thirds of it with weight gradients."""
    kind = schedule_kind(kind_name)
    p, m, v = pp, microbatches, kind.stages_per_rank
    if p == 1:
        return 0.0
    idle = (p - 1) / v  # in units of one micro-batch's forward + backward on one stage
    if kind.zero_bubble:
        idle /= 3
    return idle / (m + idle)


def split_blocks(block_costs: list[int], stages: int, first_cost: int, last_cost: int, layers=None) -> list[list[int]]:
    """Consecutive blocks for each of `stages` stages: `layers` (an int: blocks per stage; a list: the
    blocks of each stage) if given, else the split whose largest stage (its blocks' parameters, plus the
    embedding on the first and the head on the last) is smallest."""
    n = len(block_costs)
    if stages > n:
        raise ConfigError(
            f"{stages} pipeline stages for {n} blocks: every stage needs a block; lower parallel.pp "
            "(or the stages per rank of parallel.pp_schedule) or use a deeper model"
        )
    if layers is not None:
        counts = [layers] * stages if isinstance(layers, int) and not isinstance(layers, bool) else list(layers)
        if (
            len(counts) != stages
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts)
            or sum(counts) != n
        ):
            shown = list(layers) if isinstance(layers, (list, tuple)) else layers
            raise ConfigError(
                f"parallel.pp_layers_per_stage={shown} does not split {n} blocks into {stages} stages of one block "
                f"or more; give {stages} positive counts summing to {n} (e.g. {even_counts(n, stages)}), or null to balance"
            )
        starts = [sum(counts[:i]) for i in range(stages)]
        return [list(range(s, s + c)) for s, c in zip(starts, counts)]
    # linear partition by dynamic programming: best[k][i] = smallest max stage cost of blocks[:i] in k stages
    prefix = [0]
    for c in block_costs:
        prefix.append(prefix[-1] + c)

    def cost(i, j, k):  # blocks i..j-1 as stage k
        return prefix[j] - prefix[i] + (first_cost if k == 0 else 0) + (last_cost if k == stages - 1 else 0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], cost(i, j, k - 1))
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    bounds, j = [], n
    for k in range(stages, 0, -1):
        i = cut[k][j]
        bounds.append((i, j))
        j = i
    return [list(range(i, j)) for i, j in reversed(bounds)]


def even_counts(n: int, stages: int) -> list[int]:
    return [n // stages + (1 if i < n % stages else 0) for i in range(stages)]


def stage_costs(model: nn.Module) -> tuple[list[int], int, int]:
    """Parameter counts of a `Transformer` (meta or real): each block's, the first stage's extra (the
    embedding) and the last stage's extra (final norm and LM head)."""

    def count(m):
        return sum(p.numel() for p in m.parameters())

    return [count(b) for b in model.blocks], count(model.embed), count(model.norm) + count(model.lm_head)


def model_split(model: nn.Module, stages: int, layers=None) -> list[list[int]]:
    """`split_blocks` of a `Transformer`, costs being parameter counts."""
    blocks, first, last = stage_costs(model)
    return split_blocks(blocks, stages, first, last, layers)


def stage_params(model: nn.Module, split: list[list[int]]) -> list[int]:
    """Each stage's parameter count in `split` (the whole model's, before sharding)."""
    blocks, first, last = stage_costs(model)
    counts = [sum(blocks[i] for i in stage) for stage in split]
    counts[0] += first
    counts[-1] += last
    return counts


class CarryAuxLoss(torch.autograd.Function):
    """`output` in float32 (the hidden states that cross to the next stage); in backward, `aux` gets the
    gradient `scale` (the loss's own scale), so a stage's auxiliary losses reach the gradient through
    that stage's output. The output is a new tensor, never a view of the input: the zero-bubble
    schedules detach stage outputs in place, which a view refuses."""

    @staticmethod
    def forward(ctx, output, aux, scale: float):
        ctx.scale, ctx.in_dtype = scale, output.dtype
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return output.to(torch.float32, copy=True)

    @staticmethod
    def backward(ctx, grad_output):
        grad_aux = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad_output.device)
        return grad_output.to(ctx.in_dtype), grad_aux, None


class StageModel(nn.Module):
    """Blocks of a `Transformer` (its own submodules, under their own names), with the embedding if
    `first` and the final norm and LM head if `last`. Its forward takes token ids (first stage) or
    hidden states and returns hidden states or logits (last stage), the stage's aux losses carried.

    What crosses between stages is float32, whatever the compute dtype: the schedule allocates its
    receive buffers from declared shapes and dtypes (`boundary_meta`) rather than running an extra
    forward to find them (which would also step the gates' statistics on made-up tokens). The last
    stage returns its logits as computed (bf16 under autocast, no float32 copy) and leaves its aux
    losses in `last_aux` for the loss function, which runs right after that forward."""

    def __init__(self, model: nn.Module, block_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.cfg, self.init_seed = model.cfg, model.init_seed
        self.block_ids = list(block_ids)
        self.embed = model.embed if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in block_ids})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        # set by the engine before each step: the gradient scale of this micro-batch's losses
        self.aux_grad_scale = 1.0
        self.autocast = contextlib.nullcontext  # the engine's autocast for the forward (never the backward)
        self.aux_seen = torch.zeros(())  # the aux losses of this step's micro-batches (logging)
        self.last_aux = None  # the last stage: this micro-batch's aux losses, added to its loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            if self.embed is not None:
                x = self.embed(x)
            for block in self.blocks.values():
                x = block(x)
            aux = moe_aux_loss(self)
            if self.lm_head is not None:
                x = self.lm_head(self.norm(x))
        self.aux_seen = self.aux_seen.to(aux.device) + aux.detach().float()
        if self.lm_head is not None:
            self.last_aux = aux
            return x
        if torch.is_grad_enabled() and aux.requires_grad:
            return CarryAuxLoss.apply(x, aux, self.aux_grad_scale)
        return x.float()

    def init_weights(self) -> None:
        from moeflow.moe.init import init_weights

        init_weights(self, self.init_seed, self.cfg.init_std, self.cfg.n_layers)

    def moe_layers(self) -> list[MoELayer]:
        return moe_layers(self)


def boundary_meta(
    stage: int, n_stages: int, micro_batch: int, seq_len: int, d_model: int, vocab: int, logits_dtype: torch.dtype
):
    """(input, output) of stage `stage` for a micro-batch, as meta tensors: token ids into the first
    stage, float32 hidden states between stages, logits in the compute dtype out of the last."""

    def hidden():  # gradients flow back through them: receive buffers that require grad
        return torch.empty(micro_batch, seq_len, d_model, dtype=torch.float32, device="meta", requires_grad=True)

    tokens = torch.empty(micro_batch, seq_len, dtype=torch.long, device="meta")
    logits = torch.empty(micro_batch, seq_len, vocab, dtype=logits_dtype, device="meta", requires_grad=True)
    return (tokens if stage == 0 else hidden()), (logits if stage == n_stages - 1 else hidden())


def stage_models(model: nn.Module, split: list[list[int]], stage_ids: list[int]) -> tuple[list[StageModel], StageModel]:
    """This rank's stages of `model` (one `StageModel` per stage it runs) and the union of them (one
    module over all this rank's parameters, under their names: what the optimizer and checkpoints see)."""
    last = len(split) - 1
    chunks = [StageModel(model, split[s], first=s == 0, last=s == last) for s in stage_ids]
    union_ids = sorted(i for s in stage_ids for i in split[s])
    union = StageModel(model, union_ids, first=0 in stage_ids, last=last in stage_ids)
    return chunks, union
