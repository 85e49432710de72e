"""Multi-process workers for the expert-parallel tests (gloo on CPU, float64).

Each worker builds the same model on every rank from one seed, keeps a single-process
reference copy that sees the whole global batch, runs the parallel copy on this rank's
slice, and returns the largest differences; the test process asserts on them.
`spawn(...)` starts the ranks with a free port and a hard timeout, so nothing hangs.
"""

from __future__ import annotations

import copy
import importlib
import os
import shutil
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from helpers.timeouts import limit
from moeflow.moe.dispatch import combine
from moeflow.moe.experts import MLP, GroupedExperts
from moeflow.moe.gates import GATES, build_gate
from moeflow.moe.gates.topk import TopKGate
from moeflow.moe.layer import MoELayer
from moeflow.moe.model import ModelConfig, Transformer
from moeflow.parallel.clip import clip_grad_norm_
from moeflow.parallel.dispatchers import DispatchOptions
from moeflow.parallel.mesh import ParallelDims, build_mesh
from moeflow.parallel.parallelize import ShardingOptions, parallelize

EQUIVALENCE_GATES = ("topk", "sinkhorn", "dts")
D, F_, E, K = 16, 24, 8, 2


# -- process harness ---------------------------------------------------------------
def _entry(rank: int, world: int, store: str, fn_name: str, args: tuple, out_dir: str) -> None:
    # what torchrun would export (engines read it to know they are distributed), but no port:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # a file store, not a TCP port: a free port picked here can be taken by another test before
    # rank 0 listens on it (EADDRINUSE under pytest -n)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=limit(90))
    )
    try:
        result = _worker(fn_name)(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # leave together: tearing gloo down while a peer still talks aborts the process
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _worker(fn_name: str):
    """`name` (a function of this module) or `module:name` (another workers module in tests/)."""
    if ":" not in fn_name:
        return globals()[fn_name]
    module, name = fn_name.split(":")
    return getattr(importlib.import_module(module), name)


def spawn(fn_name: str, world: int, out_dir: Path, *args, timeout: float | None = None) -> list:
    """Run `fn_name(rank, world, *args)` on `world` gloo ranks; return each rank's result."""
    timeout = limit(240) if timeout is None else timeout
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    store = Path(tempfile.mkdtemp(prefix="moeflow-store-")) / "store"
    procs = [
        ctx.Process(target=_entry, args=(r, world, str(store), fn_name, args, str(out_dir)), daemon=True)
        for r in range(world)
    ]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
            p.join(5)
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)  # the rendezvous file's folder: nothing left in the temp dir
    errors = "".join(f.read_text() for f in sorted(Path(out_dir).glob("rank*.err")))
    if alive:
        raise TimeoutError(f"{fn_name} on {world} ranks did not finish in {timeout:.0f}s\n{errors}")
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"{fn_name} failed (exit codes {[p.exitcode for p in procs]}):\n{errors}")
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


# -- shared pieces -----------------------------------------------------------------
def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a - b).abs().max().item() if a.numel() else 0.0


class SkewedGate(TopKGate):
    """Top-k over experts 0..2 only, and every third token keeps only its first choice.

    With E=8 spread over EP ranks, experts 3..7 get zero tokens, so whole ranks receive
    zero rows; the dropped pairs behave like a capacity gate's.
    """

    def __init__(self, d_model, num_experts, top_k):
        super().__init__(d_model, num_experts, top_k)
        bias_E = torch.full((num_experts,), -30.0)
        bias_E[:3] = 0.0
        self.proj = _BiasedProj(self.proj, bias_E)

    def route(self, x_TD, token_ids_T=None):
        out = super().route(x_TD, token_ids_T)
        slot_A = torch.arange(out.token_A.numel()) % self.top_k
        keep_A = (out.token_A % 3 != 0) | (slot_A == 0)
        out.token_A, out.expert_A, out.weight_A = out.token_A[keep_A], out.expert_A[keep_A], out.weight_A[keep_A]
        return out


class _BiasedProj(nn.Module):
    def __init__(self, linear: nn.Linear, bias_E: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("bias_E", bias_E)

    def forward(self, x):
        return self.linear(x) + self.bias_E.to(x.dtype)


class FusedPermuteExperts(GroupedExperts):
    """Experts that take the plan and unpermuted rows (like a fused Triton kernel would)."""

    fuses_permute = True

    def forward_routed(self, x_TD, plan):
        return combine(self(x_TD[plan.token_A], plan.counts_E), plan)


def build_layer(gate_name: str, shared: bool, experts_kind: str = "grouped") -> MoELayer:
    if gate_name == "skewed":
        gate = SkewedGate(D, E, K)
    else:
        gate = build_gate(gate_name, D, E, K)
    if experts_kind == "fused":
        experts = FusedPermuteExperts(E, D, F_, "swiglu", "torch")
    else:
        experts = GroupedExperts(E, D, F_, "swiglu", "torch", bias=experts_kind == "bias")
        for b in (experts.b1_EF, experts.b3_EF, experts.b2_ED):
            if b is not None:
                nn.init.normal_(b, std=0.1)
    return MoELayer(gate, experts, MLP(D, 20) if shared else None).double()


class Holder(nn.Module):
    def __init__(self, layer: MoELayer):
        super().__init__()
        self.layer = layer

    def forward(self, x_TD, ids_T):
        return self.layer(x_TD, ids_T)


def _full(t):
    """The whole tensor of a DTensor (a collective: every rank calls it in the same order)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _param_diffs(parallel: nn.Module, ref: nn.Module, what: str) -> dict[str, float]:
    """Compare each parallel parameter (or its grad), gathered whole, with the reference's."""
    refs = dict(ref.named_parameters())
    out = {}
    for name, p in parallel.named_parameters():
        r = refs[name]
        a, b = (p.grad, r.grad) if what == "grad" else (p.detach(), r.detach())
        if a is None or b is None:
            out[name] = 0.0 if a is None and b is None else float("inf")
            continue
        out[name] = _maxdiff(_full(a), b)
    return out


def parallel_copy(module: nn.Module, ep: int, world: int, dispatch: DispatchOptions | None = None) -> nn.Module:
    """`module` parallelised in place the way engine=torch does it (FSDP2 over the world, EP=ep on the
    same mesh): gradients are summed over the ranks, so each rank's loss is scaled by 1/world; reduced in
    float64, the models' dtype here (engine=torch reduces its fp32 gradients in fp32)."""
    mesh = build_mesh(ParallelDims(world=world, ep=ep), "cpu")
    parallelize(module, mesh, ShardingOptions(reduce_dtype=torch.float64, dispatch=dispatch or DispatchOptions()))
    return module


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False)  # DTensors of two meshes: per tensor


# -- one MoE layer -----------------------------------------------------------------
def layer_cases(rank: int, world: int, cases: list[tuple]) -> dict:
    """cases: (name, ep, gate_name, overlap_chunks, overlap_shared, experts_kind). Returns name -> diffs."""
    results = {}
    for name, ep, gate_name, chunks, overlap_shared, experts_kind in cases:
        if gate_name not in GATES and gate_name != "skewed":
            continue
        torch.manual_seed(1234)
        layer = build_layer(gate_name, shared=True, experts_kind=experts_kind)
        ref = copy.deepcopy(layer)
        T = 12 * world
        gen = torch.Generator().manual_seed(99)
        x_TD = torch.randn(T, D, generator=gen, dtype=torch.float64)
        g_TD = torch.randn(T, D, generator=gen, dtype=torch.float64)
        ids_T = torch.randint(0, 256, (T,), generator=gen)
        rows = slice(rank * T // world, (rank + 1) * T // world)

        x_ref = x_TD.clone().requires_grad_()
        y_ref = ref(x_ref, ids_T)
        ((y_ref * g_TD).sum() / world + ref.aux_loss).backward()

        model = parallel_copy(
            Holder(layer), ep, world, DispatchOptions(overlap_chunks=chunks, overlap_shared=overlap_shared)
        )
        x_loc = x_TD[rows].clone().requires_grad_()
        y_loc = model(x_loc, ids_T[rows])
        (((y_loc * g_TD[rows]).sum() + layer.aux_loss) / world).backward()
        norm = clip_grad_norm_(list(model.parameters()), float("inf")).item()
        ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters() if p.grad is not None]).item()

        opt = _adamw(model.parameters())
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
        grad_diffs = _param_diffs(model.layer, ref, "grad")
        opt.step()
        ref_opt.step()
        routed_rows = layer.dispatcher.last_exchange_rows[1] if ep > 1 else None
        results[name] = {
            "out": _maxdiff(y_loc.detach(), y_ref.detach()[rows]),
            "x_grad": _maxdiff(x_loc.grad, x_ref.grad[rows]),  # the rank's loss is 1/world of its rows' share
            "grads": grad_diffs,
            "params_after_step": _param_diffs(model.layer, ref, "param"),
            "grad_norm": abs(norm - ref_norm),
            "aux": abs(layer.aux_loss.item() - ref.aux_loss.item()),
            "rows_received": routed_rows,
            "ref_tokens_per_expert": torch.bincount(_expert_ids(ref, x_ref.detach(), ids_T), minlength=E).tolist(),
        }
    return results


def _expert_ids(layer: MoELayer, x_TD, ids_T):
    with torch.no_grad():
        return layer.gate(x_TD, ids_T).expert_A


# -- a few training steps of the LM -----------------------------------------------
def tiny_model_config(gate: str = "topk") -> ModelConfig:
    return ModelConfig(
        vocab_size=64,
        d_model=16,
        n_layers=2,
        n_heads=2,
        max_seq_len=16,
        d_ff=16,
        num_experts=E,
        top_k=K,
        shared_experts=1,
        gate={"name": gate},
    )


def _batches(world: int, steps: int, micro: int, seqs_per_rank: int = 2, seq: int = 8):
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, 64, (steps, micro, world * seqs_per_rank, seq + 1), generator=gen)


def _train_steps(model: Transformer, opt, tokens, step_range, rank, world, parallel=False, clip=0.05):
    """Returns the per-step loss of the GLOBAL batch (mean over ranks) and grad norms. `parallel`: this
    rank takes its slice of each batch and scales its loss by 1/world (gradients are summed), syncing
    gradients on the step's last micro-batch only, like engine=torch."""
    losses, norms = [], []
    for step in step_range:
        micro = tokens.shape[1]
        total = 0.0
        for m in range(micro):
            batch = tokens[step, m]
            scale = 1.0
            if parallel:
                per = batch.shape[0] // world
                batch = batch[rank * per : (rank + 1) * per]
                scale = 1.0 / world
                model.set_requires_gradient_sync(m == micro - 1)
            x, y = batch[:, :-1], batch[:, 1:]
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            ((loss + model.aux_loss()) * scale / micro).backward()
            total += loss.item() / micro
        if parallel:
            t = torch.tensor([total], dtype=torch.float64)
            dist.all_reduce(t)
            total = t.item() / world
            norms.append(clip_grad_norm_(list(model.parameters()), clip).item())
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, norms


def _fresh_lm(gate: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_model_config(gate)).double()


def train_cases(rank: int, world: int, cases: list[tuple], steps: int = 3, micro: int = 2) -> dict:
    """cases: (name, ep, gate_name, overlap_chunks). Losses, grad norms and params vs one process."""
    results = {}
    tokens = _batches(world, steps, micro)
    for name, ep, gate_name, chunks in cases:
        if gate_name not in GATES:
            continue
        ref = _fresh_lm(gate_name)
        model = copy.deepcopy(ref)
        ref_losses, ref_norms = _train_steps(
            ref, torch.optim.AdamW(ref.parameters(), lr=3e-3), tokens, range(steps), rank, world
        )
        full_count = (model.num_params(), model.num_params(active_only=True))
        parallel_copy(model, ep, world, DispatchOptions(overlap_chunks=chunks))
        losses, norms = _train_steps(model, _lm_adamw(model), tokens, range(steps), rank, world, parallel=True)
        results[name] = {
            "loss": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "grad_norm": max(abs(a - b) for a, b in zip(norms, ref_norms)),
            "clipped": min(ref_norms) > 0.05,
            "params": _param_diffs(model, ref, "param"),
            "param_count": ((model.num_params(), model.num_params(active_only=True)), full_count),
        }
    return results


def _lm_adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=False)


def resume_case(rank: int, world: int, ep_save: int, ep_load: int, steps: int = 3) -> dict:
    """Train `steps - 1` steps with EP=ep_save, gather a full checkpoint (torch.distributed.checkpoint's
    state-dict API), resume with EP=ep_load (resharding model and optimizer state), take one more step;
    compare with one process."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    tokens = _batches(world, steps, 1)
    ref = _fresh_lm("topk")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    _train_steps(ref, ref_opt, tokens, range(steps - 1), rank, world)
    ref_at_save = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_losses, _ = _train_steps(ref, ref_opt, tokens, range(steps - 1, steps), rank, world)

    a = parallel_copy(_fresh_lm("topk"), ep_save, world)
    opt_a = _lm_adamw(a)
    _train_steps(a, opt_a, tokens, range(steps - 1), rank, world, parallel=True)
    saved_model, saved_opt = get_model_state_dict(a, options=full), get_optimizer_state_dict(a, opt_a, options=full)
    blob = Path(os.environ.get("TMPDIR", "/tmp")) / f"ep_resume_{os.getpid()}.pt"  # round-trip like a checkpoint
    torch.save({"model": saved_model, "opt": saved_opt}, blob)
    loaded = torch.load(blob, weights_only=False)
    blob.unlink()

    b = parallel_copy(
        _fresh_lm("topk", seed=1), ep_load, world
    )  # different init: everything must come from the checkpoint
    opt_b = _lm_adamw(b)
    set_model_state_dict(b, loaded["model"], options=full)
    set_optimizer_state_dict(b, opt_b, loaded["opt"], options=full)
    next_loss, _ = _train_steps(b, opt_b, tokens, range(steps - 1, steps), rank, world, parallel=True)
    return {
        "next_loss": abs(next_loss[0] - ref_losses[0]),
        "saved_vs_ref": max(_maxdiff(saved_model[k], ref_at_save[k]) for k in saved_model),
        "saved_keys_match": set(saved_model) == set(ref_at_save),
        "params_after": _param_diffs(b, ref, "param"),
    }
