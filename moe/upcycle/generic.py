"""The generic path: the MLPs of any `nn.Module` transformer become moeflow MoE layers."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..gates import build_gate
from ..layer import MoELayer
from .dense import DenseFFN, _noisy, build_upcycled_layer, init_router
from .options import UpcycleError, UpcycleOptions


class ModuleExperts(nn.Module):
    """Experts that are copies of an arbitrary FFN module (any activation, any layout).

    Same contract as `GroupedExperts.forward(x_AD, counts_E)`; a per-expert loop, used
    when the MLP does not map onto `GroupedExperts` exactly (e.g. BERT's erf GELU).
    """

    fuses_permute = False

    def __init__(self, module: nn.Module, num_experts: int, out_scale: float = 1.0):
        super().__init__()
        self.num_experts = num_experts
        self.out_scale = out_scale
        self.experts = nn.ModuleList(copy.deepcopy(module) for _ in range(num_experts))

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        outs = [expert(rows_AD) for expert, rows_AD in zip(self.experts, torch.split(x_AD, counts_E.tolist()))]
        y_AD = torch.cat(outs) if outs else x_AD
        return y_AD * self.out_scale if self.out_scale != 1.0 else y_AD


class ScaledFFN(nn.Module):
    """A shared expert that keeps a fixed fraction of a copied dense FFN's output."""

    def __init__(self, module: nn.Module, scale: float):
        super().__init__()
        self.module, self.scale = module, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) * self.scale


class UpcycledFFN(nn.Module):
    """An MoE layer standing where a dense MLP was, keeping that MLP's output dropout."""

    def __init__(self, moe: MoELayer, dropout: nn.Module):
        super().__init__()
        self.moe, self.dropout = moe, dropout

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.dropout(self.moe(x))


class _PairFFN(nn.Module):
    """BERT-style FFN split over two modules: intermediate (dense + act), then output.dense."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.second(self.first(x))


def _linear_weight(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of nn.Linear or HF's GPT-2 Conv1D ([in, out]); None otherwise."""
    if isinstance(mod, nn.Linear):
        return mod.weight, mod.bias
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "weight") and hasattr(mod, "nf"):
        return mod.weight.t(), mod.bias
    return None


_GATED = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))  # (gate, up, down)
_TWO_LAYER = (
    ("c_fc", "c_proj"),
    ("fc1", "fc2"),
    ("fc_in", "fc_out"),
    ("dense_h_to_4h", "dense_4h_to_h"),
    ("up_proj", "down_proj"),
    ("w1", "w2"),
)


def _ffn_parts(mod: nn.Module) -> tuple[str, ...] | None:
    children = dict(mod.named_children())
    param_children = {n for n, c in children.items() if any(True for _ in c.parameters())}
    for parts in (*_GATED, *_TWO_LAYER):
        if all(p in children and _linear_weight(children[p]) is not None for p in parts) and param_children <= set(
            parts
        ):
            return parts
    return None


def _is_bert_layer(mod: nn.Module) -> bool:
    inter, out = getattr(mod, "intermediate", None), getattr(mod, "output", None)
    return (
        inter is not None
        and out is not None
        and isinstance(getattr(inter, "dense", None), nn.Linear)
        and isinstance(getattr(out, "dense", None), nn.Linear)
    )


def find_ffns(model: nn.Module, selector: str | Callable[[str, nn.Module], bool] | None = None) -> list[str]:
    """Qualified names of the modules to upcycle, in model order.

    Default: MLP modules made of gate/up/down projections (Llama family), of two linear
    layers (GPT-2 c_fc/c_proj, fc1/fc2, GPT-NeoX, ...), with nothing else holding
    parameters, plus BERT-style layers (`intermediate` + `output.dense`, named by the
    layer). A string selector is a regex searched in the qualified module names; a
    callable gets (name, module).
    """
    names = []
    for name, mod in model.named_modules():
        if not name:
            continue
        if selector is None:
            hit = _ffn_parts(mod) is not None or _is_bert_layer(mod)
        elif callable(selector):
            hit = selector(name, mod)
        else:
            hit = re.search(selector, name) is not None
        if hit and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


def _candidate(mod: nn.Module) -> tuple[DenseFFN | None, nn.Module]:
    """A `DenseFFN` when `mod` maps onto GroupedExperts exactly (checked), plus the module itself."""
    parts = _ffn_parts(mod)
    if parts is None:
        return None, mod
    lin = [_linear_weight(getattr(mod, p)) for p in parts]
    if parts in _GATED:
        (w1, b1), (w3, b3), (w2, b2) = lin
        ffn = DenseFFN(w1, w2, w3, b1, b3, b2)
    else:
        (w1, b1), (w2, b2) = lin
        ffn = DenseFFN(w1, w2, None, b1, None, b2)
    return (ffn if _same_function(ffn, mod) else None), mod


@torch.no_grad()
def _same_function(ffn: DenseFFN, mod: nn.Module) -> bool:
    """Does GroupedExperts' math (SwiGLU / tanh-GELU, optional biases) reproduce `mod`?"""
    was_training = mod.training
    mod.eval()
    try:
        x = torch.randn(4, ffn.d_model, generator=torch.Generator().manual_seed(0)).to(
            ffn.w1_FD.device, ffn.w1_FD.dtype
        )
        want = mod(x)
        h = F.linear(x, ffn.w1_FD, ffn.b1_F)
        h = F.silu(h) * F.linear(x, ffn.w3_FD, ffn.b3_F) if ffn.w3_FD is not None else F.gelu(h, approximate="tanh")
        got = F.linear(h, ffn.w2_DF, ffn.b2_D)
    except Exception:
        return False
    finally:
        mod.train(was_training)
    tol = 1e-5 if ffn.w1_FD.dtype in (torch.float32, torch.float64) else 1e-2
    return want.shape == got.shape and torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max()))


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def upcycle_model(
    model: nn.Module,
    num_experts: int = 8,
    top_k: int = 2,
    selector: str | Callable[[str, nn.Module], bool] | None = None,
    experts_impl: str = "torch",
    options: UpcycleOptions | None = None,
    **kwargs,
) -> list[str]:
    """Replace the MLPs of any transformer by moeflow MoE layers whose experts copy them; in place.

    Options are those of `UpcycleOptions` (gate, gate_options, router_init, router_std,
    expert_noise, granularity, shared_expert, shared_fraction, moe_every, seed). MLPs that
    map onto `GroupedExperts` (SwiGLU, tanh-GELU, with or without biases) get grouped
    experts; any other module is copied whole into `ModuleExperts` (granularity must be 1).
    Returns the names of the replaced modules; add `moe_aux_loss(model)` to the loss.
    Pass `options=UpcycleOptions(...)` instead of the keywords to reuse a saved recipe.
    """
    opts = options if options is not None else UpcycleOptions(num_experts=num_experts, top_k=top_k, **kwargs)
    names = find_ffns(model, selector)
    if not names:
        how = "the selector matched no module" if selector is not None else "no MLP module was recognised"
        raise UpcycleError(
            f"{how}; pass selector= (a regex on module names such as r'layers\\.\\d+\\.mlp$', or a callable)"
        )
    gen = torch.Generator().manual_seed(opts.seed)
    replaced = []
    for i, name in enumerate(names):
        if (i + 1) % opts.moe_every:
            continue
        mod = model.get_submodule(name)
        pair = _is_bert_layer(mod) and _ffn_parts(mod) is None
        target = _PairFFN(mod.intermediate, mod.output.dense) if pair else mod
        ffn, module = _candidate(target)
        ref = next(target.parameters())
        shared = None
        if opts.shared_expert:
            shared = ScaledFFN(copy.deepcopy(module), opts.shared_fraction)
        if ffn is not None:
            layer = build_upcycled_layer(ffn, opts, experts_impl, shared, gen)
        else:
            if opts.granularity != 1:
                raise UpcycleError(
                    f"{name} ({type(module).__name__}) is not a SwiGLU/GELU MLP that can be sliced; use granularity=1 for it"
                )
            try:
                gate = build_gate(
                    opts.gate, _d_model(module, ref), opts.total_experts, opts.active_experts, **opts.gate_options
                )
            except (TypeError, ValueError) as e:
                raise UpcycleError(str(e)) from None
            out_scale = 1.0 - opts.shared_fraction if shared is not None else 1.0
            experts = ModuleExperts(module, opts.total_experts, out_scale)
            if opts.expert_noise > 0:
                for p in experts.parameters():
                    p.copy_(_noisy(p, opts.expert_noise, gen))
            layer = MoELayer(gate, experts, shared)
            init_router(layer.gate, opts.total_experts, opts, gen)
            layer.to(device=ref.device, dtype=ref.dtype)
        if pair:
            mod.intermediate = layer
            mod.output.dense = nn.Identity()
        else:
            dropout = next((c for n, c in mod.named_children() if isinstance(c, nn.Dropout)), None)
            _set_module(model, name, UpcycledFFN(layer, dropout) if dropout is not None else layer)
        replaced.append(name)
    return replaced


def _d_model(module: nn.Module, ref: torch.Tensor) -> int:
    first = next((m for m in module.modules() if _linear_weight(m) is not None), None)
    if first is None:
        raise UpcycleError(f"cannot tell the model width of {type(module).__name__}; it has no linear layer")
    return _linear_weight(first)[0].shape[1]
