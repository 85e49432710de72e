"""A CUDA out-of-memory error during training, said in one line: where it happened, what the GPU
held, and the settings that lower the peak. `check_memory` refuses only what cannot fit before the
run starts (weights, gradients, AdamW state); activations show themselves only when they run out."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from moeflow.moe.errors import MoeflowError
from moeflow.moe.model import ModelConfig


class OutOfMemory(MoeflowError):
    """The GPU ran out of memory mid-run (exit code 1: the config was valid, this device too small)."""

    exit_code = 1


def out_of_memory(
    cfg: DictConfig, model_cfg: ModelConfig, trainer_cfg, when: str, device: torch.device | None = None
) -> OutOfMemory:
    """The error to raise for a torch.OutOfMemoryError met `when` ("at step 3"; the device: this rank's GPU)."""
    from .config import bf16_moments_would_help, train_state_per_rank

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    state, _ = train_state_per_rank(cfg, model_cfg, device)
    held = ""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device.index or 0).total_memory
        peak = torch.cuda.max_memory_allocated(device)
        held = f" ({device}: {peak / 2**30:.1f} of {total / 2**30:.1f} GiB allocated at the peak"
        held += f", of which weights, gradients and AdamW state ~{state / 2**30:.1f} GiB)"
    return OutOfMemory(
        f"out of GPU memory {when}{held}; lower the peak with {', '.join(_remedies(cfg, trainer_cfg, bf16_moments_would_help(cfg)))}"
    )


def _remedies(cfg: DictConfig, trainer_cfg, bf16_moments: bool) -> list[str]:
    """The settings that lower this run's peak, the cheapest in speed first."""
    out = []
    batch = int(cfg.data.batch_size)
    if batch > 1:
        keep = (
            "data.global_batch_size keeps the batch"
            if cfg.data.get("global_batch_size") is not None
            else f"trainer.grad_accum={2 * trainer_cfg.grad_accum} keeps the batch"
        )
        out.append(f"data.batch_size={batch // 2} ({keep})")
    if bf16_moments:
        out.append("optim.moments_dtype=bfloat16")
    if trainer_cfg.activation_checkpointing != "full":
        out.append("trainer.activation_checkpointing=full")
    out.append("more GPUs (FSDP spreads the state over them)")
    return out
