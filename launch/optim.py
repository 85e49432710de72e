"""AdamW and its learning-rate schedule, built the same way for every engine."""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
from omegaconf import DictConfig


def _placement(p: torch.Tensor) -> str:
    """Plain tensor, or a DTensor on a given mesh."""
    mesh = getattr(p, "device_mesh", None)
    return "plain" if mesh is None else f"dtensor{tuple(mesh.mesh_dim_names or ())}"


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups {dense, experts} x {decay: matrices, no decay: vectors}, empty ones dropped, named
    `dense_decay`, `experts_no_decay`, ... (every engine's: DeepSpeed reduces the expert ones apart;
    a checkpoint's group settings are matched by these names, `parallel.checkpoint.load_sharded`).

    AdamW makes one multi-tensor (foreach/fused) call per group, and one call cannot mix plain
    tensors with DTensors, nor DTensors of different meshes. Dense parameters all share one
    placement (FSDP's mesh, or none) and so do the experts (the expert mesh, or plain), but the
    two differ (a named transport in one process: dense DTensors, plain experts). Grouping by
    kind rather than by mesh keeps the groups the same on every mesh, which resharding a
    checkpoint's optimizer state needs."""
    from moeflow.parallel.plan import is_expert

    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((is_expert(name), p.dim() >= 2), []).append(p)
    out = []
    for (expert, decay), params in sorted(groups.items()):
        if len({_placement(p) for p in params}) > 1:
            raise RuntimeError(
                f"{'expert' if expert else 'dense'} parameters sit on different meshes {sorted({_placement(p) for p in params})}: "
                "AdamW cannot step them in one group"
            )
        out.append(
            {
                "params": params,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"{'experts' if expert else 'dense'}_{'decay' if decay else 'no_decay'}",
            }
        )
    return out


def build_optimizer(model: torch.nn.Module, o: DictConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only; fused on CUDA (one kernel per group, no temporaries
    of the parameters' size: the multi-tensor path allocates a sqrt of every second moment).
    `optim.master_weights` or bf16 `optim.moments_dtype`: `MasterWeightAdamW` (bf16 compute copies
    written by the step; moments in the dtype asked)."""
    groups = optimizer_groups(model, o.weight_decay)
    moments = MOMENT_DTYPES[o.get("moments_dtype", "float32")]
    if o.master_weights or moments != torch.float32:
        return MasterWeightAdamW(
            groups,
            bf16_compute_params(model) if o.master_weights else [],
            lr=float(o.lr),
            betas=tuple(float(b) for b in o.betas),
            eps=float(o.eps),
            moments_dtype=moments,
            remainders=bool(o.get("master_remainders", False)),
        )
    fused = all(p.is_cuda for g in groups for p in g["params"]) and any(g["params"] for g in groups)
    return torch.optim.AdamW(
        groups, lr=float(o.lr), betas=tuple(float(b) for b in o.betas), eps=float(o.eps), fused=fused or None
    )


MOMENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # optim.moments_dtype


def train_state_bytes(o) -> int:
    """Bytes per parameter of weights, gradients and AdamW moments: fp32 weight + fp32 gradient, or
    with master weights fp32 weight + bf16 copy + bf16 gradient (bf16 weight + its 16 low bits + bf16
    gradient with `master_remainders`, which counts every parameter as a lowered one: embeddings and
    norms, a few % of an MoE's parameters, hold 2 B more); plus two moments of 4 or 2 B."""
    moments = 2 * MOMENT_DTYPES[o.get("moments_dtype", "float32")].itemsize
    return (6 if o.get("master_weights") and o.get("master_remainders") else 8) + moments


def bf16_compute_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters autocast would cast to bf16 at every use: Linear weights and biases and the
    stacked expert matrices (cast by `moe.experts`); never an embedding (looked up in fp32, also when
    tied to the output layer), a norm weight or an expert bias (used in fp32)."""
    from moeflow.moe.experts import GroupedExperts

    fp32 = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    out = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            out += [p for p in (module.weight, module.bias) if p is not None]
        elif isinstance(module, GroupedExperts):
            out += [p for p in (module.w1_EDF, module.w3_EDF, module.w2_EFD) if p is not None]
    return [p for p in dict.fromkeys(out) if id(p) not in fp32]


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW whose step also writes the bf16 copy the forward computes with (`optim.master_weights`),
    and whose moments may be bf16 (`optim.moments_dtype=bfloat16`, rounded stochastically; with no
    compute params it is plain AdamW on fp32 weights with bf16 moments).

    The parameters autocast would cast at every use (`bf16_compute_params`) are stored in bf16 in
    the model, and their fp32 values live here (`state["master"]`); the step reads the bf16 gradient
    and writes master, moments and the bf16 copy in one kernel (`moeflow.kernels.adamw`): 28 B per
    parameter against 40 B for autocast's casts plus fused AdamW. The forward is the same: autocast
    would have rounded the same fp32 weights to bf16. Other parameters stay fp32 and take the same
    update. Checkpoints hold the fp32 weights (`masters_in_model`), the moments under torch AdamW's
    names. The clip factor is read from `grad_scale` like torch's fused AdamW (parallel/clip.py).
    One process, no FSDP (FSDP2 keeps its own fp32 shards and casts when it gathers).

    With `remainders` (`optim.master_remainders`) the state keeps only each fp32 weight's low 16 bits
    (`state["master_low"]`, int16): the bf16 weight in the model is its high half, and the two are
    the fp32 bits exactly (`moeflow.kernels.adamw.split_master`). 2 B per parameter less memory and
    step traffic; checkpoints still hold the fp32 weights.
    """

    accepts_grad_scale = True  # parallel/clip.py folds the clip factor into the step

    def __init__(
        self,
        groups,
        compute_params,
        lr: float,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        moments_dtype: torch.dtype = torch.float32,
        remainders: bool = False,
    ):
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.moments_dtype = moments_dtype
        lowered = {id(p) for p in compute_params}
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state[p]
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    for name in ("exp_avg", "exp_avg_sq"):
                        state[name] = torch.zeros_like(p, dtype=moments_dtype, memory_format=torch.contiguous_format)
                    if id(p) in lowered and p.dtype == torch.float32 and remainders:
                        p.data, state["master_low"] = _halves_on(p.device, p.data)
                    elif id(p) in lowered and p.dtype == torch.float32:
                        state["master"] = p.detach().clone(memory_format=torch.contiguous_format)
                        p.data = p.data.to(torch.bfloat16)

    @torch.no_grad()
    def step(self, closure=None):
        from moeflow.kernels.adamw import adamw_master_step

        scale = getattr(self, "grad_scale", None)  # the clip factor's reciprocal (parallel/clip.py), on the device
        inv = {}
        index = 0  # the tensor's place in the optimizer: with the step, the seed of its moments' rounding
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] += 1  # a CPU scalar: no host read of the device
                step = int(state["step"])
                if p.device not in inv:
                    one = torch.ones((), device=p.device, dtype=torch.float32)
                    inv[p.device] = one / scale.to(p.device, torch.float32) if scale is not None else one
                master = state.get("master", state.get("master_low"))
                adamw_master_step(
                    master if master is not None else p.data,
                    p.data,
                    p.grad,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    inv[p.device],
                    step,
                    group["lr"],
                    beta1,
                    beta2,
                    group["eps"],
                    group["weight_decay"],
                    seed=(step << 24) + index,
                )

    def state_dict(self):
        """torch AdamW's state (the fp32 weights travel as the model's, see `masters_in_model`)."""
        out = super().state_dict()
        out["state"] = {k: {n: v for n, v in s.items() if n not in MASTER_KEYS} for k, s in out["state"].items()}
        return out

    def load_state_dict(self, state_dict):
        masters = {
            id(p): {n: self.state[p][n] for n in MASTER_KEYS if n in self.state[p]}
            for g in self.param_groups
            for p in g["params"]
        }
        # torch's load would cast the moments to each parameter's dtype (all at once: with bf16 moments a
        # transient fp32 copy of every moment); they are set here in their own dtype, one tensor at a time
        moments = {"exp_avg", "exp_avg_sq"}
        saved = state_dict["state"]
        super().load_state_dict(
            {**state_dict, "state": {k: {n: v for n, v in s.items() if n not in moments} for k, s in saved.items()}}
        )
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for name in moments & set(saved.get(i, {})):
                self.state[p][name] = saved[i][name].to(p.device, self.moments_dtype).contiguous()
            self.state[p].update(masters.get(id(p), {}))

    @contextlib.contextmanager
    def masters_in_model(self):
        """The model's bf16 copies swapped for their fp32 weights (to save, load or export them); on the
        way out the bf16 copies are rewritten from the fp32 weights, which a load may have changed.
        With remainders the fp32 weights are joined from the two halves in host memory (4 B a
        parameter there, none on the GPU: a save copies them to the host anyway), and split back."""
        from moeflow.kernels.adamw import join_master, split_master

        params = [p for g in self.param_groups for p in g["params"] if "master" in self.state[p]]
        halves = {p: p.data for g in self.param_groups for p in g["params"] if "master_low" in self.state[p]}
        with torch.no_grad():
            for p in params:
                state = self.state[p]
                p.data, state["master"] = state["master"], p.data
            for p, high in halves.items():
                p.data = join_master(high.cpu(), self.state[p]["master_low"].cpu())
            try:
                yield
            finally:
                for p in params:  # self.state[p] afresh: a load_state_dict inside replaced the dicts
                    state = self.state[p]
                    p.data, state["master"] = state["master"], p.data
                    p.data.copy_(state["master"])
                for p, high in halves.items():
                    new_high, new_low = split_master(p.data.cpu())
                    high.copy_(new_high)
                    self.state[p]["master_low"].copy_(new_low)
                    p.data = high


def _halves_on(device: torch.device, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`split_master` of one fp32 weight, computed in host memory (its int temporaries never take GPU
    memory) and moved to `device`: the bf16 weight and the low half, contiguous."""
    from moeflow.kernels.adamw import split_master

    high, low = split_master(w.detach().cpu())
    return high.to(device), low.to(device)


MASTER_KEYS = ("master", "master_low")  # the fp32 weights' state, never saved (they travel as the model's)


def masters_in_model(optimizer):
    """`MasterWeightAdamW.masters_in_model()`, or nothing to do for any other optimizer."""
    return optimizer.masters_in_model() if isinstance(optimizer, MasterWeightAdamW) else contextlib.nullcontext()


def build_scheduler(opt: torch.optim.Optimizer, o: DictConfig, total_steps: int):
    """Linear warmup, then cosine decay to min_lr (or constant)."""
    floor = o.min_lr / o.lr

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def replay_schedule(sched, steps: int) -> None:
    """Advance a schedule `steps` steps without optimizer steps (a resume whose moments did not survive)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping the schedule without optimizer steps, on purpose
        for _ in range(steps):
            sched.step()


def fresh_optimizer_state(model_cfg, optim_cfg, total_steps: int, step: int) -> tuple[dict, dict]:
    """(optimizer, scheduler) state dicts engine=torch resumes from at `step`: AdamW with zero
    moments (for checkpoints whose moments are in another engine's layout) and the schedule at `step`."""
    from moeflow.moe.model import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg)
    opt = build_optimizer(model, optim_cfg)
    sched = build_scheduler(opt, optim_cfg, total_steps)
    replay_schedule(sched, step)
    return opt.state_dict(), sched.state_dict()
