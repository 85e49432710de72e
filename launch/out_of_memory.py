"""A CUDA out-of-memory error during training, said in one line: where it happened, what the GPU
held, and the settings that lower the peak. `check_memory` refuses only what cannot fit before the
run starts (weights, gradients, AdamW state); activations show themselves only when they run out."""

from __future__ import annotations

import re

import torch
from omegaconf import DictConfig

from moeflow.moe.errors import MoeflowError
from moeflow.moe.model import ModelConfig

FRAGMENTED_GIB = 1.0  # reserved but unallocated beyond this: the allocator's own advice applies


class OutOfMemory(MoeflowError):
    """The GPU ran out of memory mid-run (exit code 1: the config was valid, this device too small)."""

    exit_code = 1


def find_oom(err: BaseException | None) -> torch.OutOfMemoryError | None:
    """torch's OutOfMemoryError, also where another error wraps it (a pipeline stage's RuntimeError,
    torch.compile's backend errors chain it as their cause)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, torch.OutOfMemoryError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def out_of_memory(
    cfg: DictConfig,
    model_cfg: ModelConfig,
    trainer_cfg,
    when: str,
    device: torch.device | None = None,
    oom: BaseException | None = None,
) -> OutOfMemory:
    """The error to raise for a torch.OutOfMemoryError (`oom`) met `when` ("at step 3"; the device:
    this rank's GPU)."""
    from .config import bf16_moments_would_help, train_state_per_rank
    from .engines import engine_name

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch_engine = engine_name(cfg) == "torch"
    held, tip = "", ""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory / 2**30
        peak = torch.cuda.max_memory_allocated(index) / 2**30
        reserved = torch.cuda.memory_reserved(index) / 2**30
        allocated = torch.cuda.memory_allocated(index) / 2**30
        asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", str(oom or ""))
        held = f" ({f'asked for {asked.group(1)}; ' if asked else ''}{device}: {peak:.1f} of {total:.1f} GiB allocated at the peak"
        if torch_engine:
            state, _ = train_state_per_rank(cfg, model_cfg, device)
            held += f", weights, gradients and AdamW state ~{state / 2**30:.1f} GiB of it"
        held += ")"
        if reserved - allocated > FRAGMENTED_GIB:
            tip = (
                f"; {reserved - allocated:.1f} GiB were reserved but free (fragmentation): "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True may be enough"
            )
    remedies = _remedies(cfg, trainer_cfg, torch_engine, bf16_moments_would_help(cfg))
    return OutOfMemory(f"out of GPU memory {when}{held}; lower the peak with {', '.join(remedies)}{tip}")


def _remedies(cfg: DictConfig, trainer_cfg, torch_engine: bool, bf16_moments: bool) -> list[str]:
    """The settings that lower this run's peak and that it can still take, the cheapest in speed first."""
    out = []
    batch = int(cfg.data.batch_size)
    one_micro_batch = bool(cfg.optim.get("master_weights"))  # bf16 gradients are not summed across micro-batches
    if batch > 1:
        if one_micro_batch:
            out.append(
                f"data.batch_size={batch // 2} (a smaller batch: optim.master_weights takes no trainer.grad_accum)"
            )
        else:
            smaller = max(d for d in range(1, batch) if batch % d == 0)  # the same batch in whole micro-batches
            keep = (
                "data.global_batch_size keeps the batch"
                if cfg.data.get("global_batch_size") is not None
                else f"trainer.grad_accum={trainer_cfg.grad_accum * batch // smaller} keeps the batch"
            )
            out.append(f"data.batch_size={smaller} ({keep})")
    if bf16_moments:
        out.append("optim.moments_dtype=bfloat16")
    if one_micro_batch and not cfg.optim.get("master_remainders"):
        out.append("optim.master_remainders=true")
    if torch_engine and trainer_cfg.activation_checkpointing != "full":
        out.append("trainer.activation_checkpointing=full")
    if not torch_engine or not (one_micro_batch or cfg.optim.get("moments_dtype", "float32") != "float32"):
        out.append("more GPUs (the state is sharded over them)")  # master weights and bf16 moments need one process
    return out
