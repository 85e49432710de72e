"""Weight initialisation that does not depend on how the model is laid out.

Every tensor gets its values from its own generator, seeded by (model seed, tensor name): the
full tensor is drawn, and a sharded parameter (a DTensor: FSDP, expert or tensor parallelism)
keeps its own slice of it. So a model built on the meta device, parallelised, materialised
and initialised here equals, on every rank, the single-process model built with the same seed.

The rules (GPT-2 style): matrices normal(0, init_std); projections into the residual stream
(attention `out`, MLP `w2`, experts' `w2_EFD`) normal(0, init_std / sqrt(2 n_layers)); biases
zero; norm weights one; router projections normal(0, the gate's own `init_std`), or zero.
Buffers are reset too: rotary tables recomputed, gate state zeroed.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

OUTPUT_PROJECTIONS = ("out.weight", "w2.weight", "w2_EFD")


def tensor_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one tensor of a model (the same in every process and run)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _rule(name: str, param: torch.Tensor, module: nn.Module, std: float, out_std: float):
    """(kind, std) for a parameter: 'normal' | 'zeros' | 'ones' | 'keep'."""
    router_std = getattr(module, "init_std", None)
    if router_std is not None:  # a gate's router projection (moe.gates.common.router_projection)
        return ("normal", router_std) if router_std > 0 else ("zeros", 0.0)
    if name.endswith("bias") or name.split(".")[-1].startswith("b") and name.split(".")[-1][1:2].isdigit():
        return "zeros", 0.0  # nn.Linear biases, experts' b1_EF / b3_EF / b2_ED
    if param.dim() < 2:
        return "ones", 0.0  # RMSNorm weights
    return "normal", out_std if name.endswith(OUTPUT_PROJECTIONS) else std


def _full_values(kind: str, std: float, shape, dtype, device, seed: int) -> torch.Tensor:
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype, device=device)
    if kind == "ones":
        return torch.ones(shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float32, device=device) * std).to(dtype)


@torch.no_grad()
def assign_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write `full` (the whole tensor) into `param`, or this rank's slice of it for a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, std: float, n_layers: int) -> None:
    """Initialise every parameter and buffer of `model` (see the module docstring)."""
    from torch.distributed.tensor import DTensor

    out_std = std / math.sqrt(2 * n_layers)
    modules = dict(model.named_modules())
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # tied weights: the first name decides
            continue
        seen.add(id(param))
        owner = modules[name.rsplit(".", 1)[0]] if "." in name else model
        kind, kind_std = _rule(name, param, owner, std, out_std)
        local = param.to_local() if isinstance(param, DTensor) else param
        full = _full_values(kind, kind_std, param.shape, param.dtype, local.device, tensor_seed(seed, _canonical(name)))
        assign_full(param, full)
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if reset is not None:
            reset()


def _canonical(name: str) -> str:
    """The parameter's name in the plain model (wrappers such as activation checkpointing add parts)."""
    return ".".join(
        part
        for part in name.split(".")
        if part not in ("_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod")
    )
