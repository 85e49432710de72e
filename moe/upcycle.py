"""Sparse upcycling: initialise an MoE from a dense model by copying each MLP into every expert.

Function preservation (Komatsuzaki et al. 2022): with identical experts and a gate whose
weights over the chosen experts sum to 1 (softmax top-k with renormalisation), the MoE
layer computes exactly the dense MLP, whatever the router picks. The router starts at
zero (uniform routing) or small-normal; both are exact.

Granular upcycling (granularity m): the dense hidden dimension F is split into m slices
of width F/m, and the N copies of the dense MLP become N*m experts (copy-major: expert
c*m + j is slice j of copy c) with top_k*m active, the same active parameter count.
Since the MLP is elementwise over its hidden units, sum_j slice_j(x) == mlp(x). Each
slice's down projection is scaled by m, so the renormalised weights 1/(k*m) of a
uniform selection give each slice total weight 1. Exact when the selected K = k*m
experts hold every slice equally often. That is guaranteed when the router rows are
tied across the m slices of a copy and differ between copies: each copy's m slices then
have identical logits, and top-(k*m) takes k whole copies. This is `router_init="auto"`
for m > 1 (small-normal, tied). A zero router ties *all* experts, and
tie-breaking may then pick an unbalanced set; it is exact only when top_k == num_experts.

`upcycle_model` is the generic path for any `nn.Module` transformer (Hugging Face
Llama/Mistral/Qwen/GPT-2/BERT, ...): MLP modules found by a selector become `MoELayer`s.
`upcycle_transformer` upcycles a dense moeflow `Transformer` into a new one whose config
(and so its checkpoint) describes the MoE, for `moeflow train`.
"""
from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .experts import MLP, GroupedExperts
from .gates import build_gate
from .layer import MoELayer
from .model import ModelConfig, Rotary, Transformer

ROUTER_INITS = ("auto", "zero", "normal")


class UpcycleError(ValueError):
    """A problem with the model or the options that the user can fix."""


@dataclass
class UpcycleOptions:
    """What `moeflow upcycle` and the Python API accept.

    num_experts: copies of the dense MLP (N); with granularity m the layer has N*m experts.
    top_k: experts per token before granular scaling (the layer uses top_k*m).
    router_init: "zero" (uniform routing), "normal" (std router_std) or "auto" (zero, or
        tied small-normal when granularity > 1; see the module docstring).
    expert_noise: Gaussian noise added to each copy, relative to each weight's std
        (breaks symmetry, so the output is no longer exactly preserved; off by default).
    shared_expert: keep a copy of the dense MLP as an always-on shared expert; it takes
        `shared_fraction` of the output and the routed experts the rest (exact).
    moe_every: every moe_every-th FFN becomes an MoE layer (1: all).
    """

    num_experts: int = 8
    top_k: int = 2
    gate: str = "topk"
    gate_options: dict = field(default_factory=dict)
    router_init: str = "auto"
    router_std: float = 0.02
    expert_noise: float = 0.0
    granularity: int = 1
    shared_expert: bool = False
    shared_fraction: float = 0.5
    moe_every: int = 1
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise UpcycleError(msg)

        need(isinstance(self.num_experts, int) and self.num_experts >= 1, f"num_experts must be a positive integer, got {self.num_experts!r}")
        need(isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts, f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        need(isinstance(self.granularity, int) and self.granularity >= 1, f"granularity must be a positive integer, got {self.granularity!r}")
        need(self.router_init in ROUTER_INITS, f"router_init={self.router_init!r} is unknown; choose one of {', '.join(ROUTER_INITS)}")
        need(self.router_std >= 0, f"router_std must be >= 0, got {self.router_std}")
        need(self.expert_noise >= 0, f"expert_noise must be >= 0, got {self.expert_noise}")
        need(0.0 < self.shared_fraction < 1.0, f"shared_fraction must be in (0, 1), got {self.shared_fraction}")
        need(isinstance(self.moe_every, int) and self.moe_every >= 1, f"moe_every must be a positive integer, got {self.moe_every!r}")

    @property
    def total_experts(self) -> int:
        return self.num_experts * self.granularity

    @property
    def active_experts(self) -> int:
        return self.top_k * self.granularity

    @property
    def resolved_router_init(self) -> str:
        if self.router_init != "auto":
            return self.router_init
        return "normal" if self.granularity > 1 else "zero"

    @property
    def exact(self) -> bool:
        """Whether the upcycled model must reproduce the dense one (what --verify checks).

        Known exact gates: topk with renormalised weights, and dts (at step 0 every expert
        is active and the softmax weights sum to 1). Other gates may drop tokens or weigh
        them otherwise; --verify then reports the difference without failing.
        """
        if self.expert_noise > 0:
            return False
        if self.gate == "dts":
            return True
        if self.gate != "topk" or not self.gate_options.get("renormalize", True):
            return False
        if self.granularity > 1 and self.resolved_router_init == "zero":
            return self.top_k == self.num_experts
        return True

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------
# A dense FFN in one canonical form (nn.Linear layout: weights are [out, in]).


@dataclass
class DenseFFN:
    w1_FD: torch.Tensor  # input projection (the gate projection of a SwiGLU MLP)
    w2_DF: torch.Tensor  # output projection
    w3_FD: torch.Tensor | None = None  # SwiGLU's up projection
    b1_F: torch.Tensor | None = None
    b3_F: torch.Tensor | None = None
    b2_D: torch.Tensor | None = None

    @property
    def activation(self) -> str:
        return "swiglu" if self.w3_FD is not None else "gelu"

    @property
    def has_bias(self) -> bool:
        return any(b is not None for b in (self.b1_F, self.b3_F, self.b2_D))

    @property
    def d_ff(self) -> int:
        return self.w1_FD.shape[0]

    @property
    def d_model(self) -> int:
        return self.w1_FD.shape[1]

    @classmethod
    def from_mlp(cls, mlp: MLP) -> "DenseFFN":
        return cls(mlp.w1.weight, mlp.w2.weight, mlp.w3.weight if mlp.w3 is not None else None)

    @classmethod
    def from_expert(cls, experts: GroupedExperts, e: int = 0) -> "DenseFFN":
        pick = lambda t: t[e] if t is not None else None  # noqa: E731
        w3 = experts.w3_EDF[e].t() if experts.w3_EDF is not None else None
        return cls(experts.w1_EDF[e].t(), experts.w2_EFD[e].t(), w3, pick(experts.b1_EF), pick(experts.b3_EF), pick(experts.b2_ED))


def _noisy(t: torch.Tensor, rel_std: float, gen: torch.Generator | None) -> torch.Tensor:
    if rel_std <= 0:
        return t
    noise = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.device, t.dtype)
    return t + noise * (rel_std * t.float().std().clamp_min(1e-12).item())


@torch.no_grad()
def fill_experts(experts: GroupedExperts, ffn: DenseFFN, copies: int, granularity: int, out_scale: float = 1.0, noise: float = 0.0, gen: torch.Generator | None = None) -> None:
    """Copy `ffn` into copies*granularity experts: expert c*m + j holds slice j of copy c.

    Slices are scaled by m (and by out_scale, e.g. 1 - shared_fraction) on the output side.
    """
    m, F_ = granularity, ffn.d_ff
    if F_ % m:
        raise UpcycleError(f"granularity={m} does not divide the MLP hidden size {F_}; pick a divisor of {F_}")
    if experts.num_experts != copies * m or experts.d_ff != F_ // m:
        raise UpcycleError(f"experts module has {experts.num_experts} experts of width {experts.d_ff}, expected {copies * m} of width {F_ // m}")
    if (experts.w3_EDF is None) != (ffn.w3_FD is None):
        raise UpcycleError(f"experts activation {experts.activation} does not match the dense MLP ({ffn.activation})")
    width, scale = F_ // m, m * out_scale
    for c in range(copies):
        for j in range(m):
            e, sl = c * m + j, slice(j * width, (j + 1) * width)
            experts.w1_EDF[e].copy_(_noisy(ffn.w1_FD[sl].t(), noise, gen))
            if ffn.w3_FD is not None:
                experts.w3_EDF[e].copy_(_noisy(ffn.w3_FD[sl].t(), noise, gen))
            experts.w2_EFD[e].copy_(_noisy(ffn.w2_DF[:, sl].t() * scale, noise, gen))
            for dst, src in ((experts.b1_EF, ffn.b1_F), (experts.b3_EF, ffn.b3_F)):
                if dst is not None:
                    dst[e].copy_(src[sl] if src is not None else torch.zeros_like(dst[e]))
            if experts.b2_ED is not None:
                # not sliced or scaled by m: a token's gate weights sum to 1, so b2 is added once
                experts.b2_ED[e].copy_(ffn.b2_D * out_scale if ffn.b2_D is not None else torch.zeros_like(experts.b2_ED[e]))


@torch.no_grad()
def init_router(gate: nn.Module, num_experts: int, opts: UpcycleOptions, gen: torch.Generator | None = None) -> None:
    """Zero or small-normal router weights; normal rows tied across the m slices of a copy."""
    kind, m = opts.resolved_router_init, opts.granularity
    for name, p in gate.named_parameters():
        if p.dim() == 1 and p.shape[0] == num_experts:
            p.zero_()  # router biases: uniform start
            continue
        if p.dim() != 2 or num_experts not in p.shape:
            continue
        experts_first = p.shape[0] == num_experts
        w_ED = p if experts_first else p.t()
        if kind == "zero" or opts.router_std == 0:
            w_ED.zero_()
            continue
        rows = torch.randn((num_experts // m, w_ED.shape[1]), generator=gen, dtype=torch.float32) * opts.router_std
        w_ED.copy_(rows.repeat_interleave(m, dim=0).to(p.dtype))


def build_upcycled_layer(ffn: DenseFFN, opts: UpcycleOptions, experts_impl: str = "torch", shared: nn.Module | None = None, gen: torch.Generator | None = None) -> MoELayer:
    """A `MoELayer` whose experts are (granular) copies of `ffn`: the generic building block."""
    E, K = opts.total_experts, opts.active_experts
    if ffn.d_ff % opts.granularity:
        raise UpcycleError(f"granularity={opts.granularity} does not divide the MLP hidden size {ffn.d_ff}; pick a divisor of {ffn.d_ff}")
    try:
        gate = build_gate(opts.gate, ffn.d_model, E, K, **opts.gate_options)
    except (TypeError, ValueError) as e:
        raise UpcycleError(str(e)) from None
    experts = GroupedExperts(E, ffn.d_model, ffn.d_ff // opts.granularity, ffn.activation, impl=experts_impl, bias=ffn.has_bias)
    layer = MoELayer(gate, experts, shared)
    fill_moe_layer(layer, ffn, opts, gen)
    return layer.to(device=ffn.w1_FD.device, dtype=ffn.w1_FD.dtype)


@torch.no_grad()
def fill_moe_layer(layer: MoELayer, ffn: DenseFFN, opts: UpcycleOptions, gen: torch.Generator | None = None) -> None:
    out_scale = 1.0 - opts.shared_fraction if layer.shared_expert is not None else 1.0
    fill_experts(layer.experts, ffn, opts.num_experts, opts.granularity, out_scale, opts.expert_noise, gen)
    init_router(layer.gate, opts.total_experts, opts, gen)
    if isinstance(layer.shared_expert, MLP):
        s = layer.shared_expert
        s.w1.weight.copy_(ffn.w1_FD)
        if s.w3 is not None:
            s.w3.weight.copy_(ffn.w3_FD)
        s.w2.weight.copy_(ffn.w2_DF * opts.shared_fraction)


# --------------------------------------------------------------------------------------
# moeflow Transformer -> moeflow MoE Transformer (the checkpoint path)


def dense_ffns(model: Transformer) -> list[DenseFFN]:
    """The dense FFN of every block: a dense MLP, or the single expert of a 1-expert MoE block."""
    out = []
    for i, block in enumerate(model.blocks):
        ffn = block.ffn
        if isinstance(ffn, MLP):
            out.append(DenseFFN.from_mlp(ffn))
        elif isinstance(ffn, MoELayer) and ffn.experts.num_experts == 1 and ffn.shared_expert is None:
            out.append(DenseFFN.from_expert(ffn.experts, 0))
        else:
            raise UpcycleError(f"block {i} is already a mixture of {ffn.experts.num_experts} experts; upcycle a dense checkpoint (model.num_experts=1 or moe_every=0)")
    return out


def upcycled_config(dense: ModelConfig, d_ff: int, opts: UpcycleOptions) -> ModelConfig:
    if d_ff % opts.granularity:
        raise UpcycleError(f"granularity={opts.granularity} does not divide the MLP hidden size {d_ff}; pick a divisor of {d_ff}")
    gate = {"name": opts.gate, **opts.gate_options}
    try:
        return replace(
            dense,
            num_experts=opts.total_experts,
            top_k=opts.active_experts,
            d_ff=d_ff // opts.granularity,
            dense_d_ff=d_ff,
            moe_every=opts.moe_every,
            shared_experts=1 if opts.shared_expert else 0,
            gate=gate,
        )
    except ValueError as e:
        raise UpcycleError(str(e)) from None


@torch.no_grad()
def upcycle_transformer(dense: Transformer, opts: UpcycleOptions) -> Transformer:
    """A new moeflow `Transformer` with MoE FFNs initialised from `dense` (left untouched)."""
    ffns = dense_ffns(dense)
    widths = {f.d_ff for f in ffns}
    if len(widths) != 1:
        raise UpcycleError(f"the dense blocks have different MLP widths {sorted(widths)}; upcycle needs one width")
    if any(f.activation != dense.cfg.activation for f in ffns):
        raise UpcycleError("the dense MLPs' activation does not match model.activation")
    cfg = upcycled_config(dense.cfg, widths.pop(), opts)
    gen = torch.Generator().manual_seed(opts.seed)
    param = next(dense.parameters())
    with torch.device("meta"):  # no random init of billions of expert weights: every tensor is written below
        moe = Transformer(cfg)
    moe = moe.to_empty(device=param.device).to(param.dtype)
    state = {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    unwritten = [k for k in missing if ".ffn." not in k and not (cfg.tie_embeddings and k == "lm_head.weight")]
    if unexpected or unwritten:
        raise UpcycleError(f"dense and upcycled models differ outside the FFNs (unexpected {unexpected[:3]}, missing {unwritten[:3]})")
    gate_opts = {k: v for k, v in cfg.gate.items() if k != "name"}
    for block, ffn in zip(moe.blocks, ffns):
        block.attn.rotary = Rotary(cfg.head_size, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling).to(param.device)
        if isinstance(block.ffn, MoELayer):
            block.ffn.gate = build_gate(cfg.gate["name"], cfg.d_model, cfg.num_experts, cfg.top_k, **gate_opts).to(param.device, param.dtype)
            fill_moe_layer(block.ffn, ffn, opts, gen)
        else:
            block.ffn.w1.weight.copy_(ffn.w1_FD)
            if block.ffn.w3 is not None:
                block.ffn.w3.weight.copy_(ffn.w3_FD)
            block.ffn.w2.weight.copy_(ffn.w2_DF)
    if cfg.tie_embeddings:
        moe.lm_head.weight = moe.embed.weight
    return moe


# --------------------------------------------------------------------------------------
# The generic path: any nn.Module transformer


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
_TWO_LAYER = (("c_fc", "c_proj"), ("fc1", "fc2"), ("fc_in", "fc_out"), ("dense_h_to_4h", "dense_4h_to_h"), ("up_proj", "down_proj"), ("w1", "w2"))


def _ffn_parts(mod: nn.Module) -> tuple[str, ...] | None:
    children = dict(mod.named_children())
    param_children = {n for n, c in children.items() if any(True for _ in c.parameters())}
    for parts in (*_GATED, *_TWO_LAYER):
        if all(p in children and _linear_weight(children[p]) is not None for p in parts) and param_children <= set(parts):
            return parts
    return None


def _is_bert_layer(mod: nn.Module) -> bool:
    inter, out = getattr(mod, "intermediate", None), getattr(mod, "output", None)
    return inter is not None and out is not None and isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(getattr(out, "dense", None), nn.Linear)


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
        x = torch.randn(4, ffn.d_model, generator=torch.Generator().manual_seed(0)).to(ffn.w1_FD.device, ffn.w1_FD.dtype)
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
        raise UpcycleError(f"{how}; pass selector= (a regex on module names such as r'layers\\.\\d+\\.mlp$', or a callable)")
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
                raise UpcycleError(f"{name} ({type(module).__name__}) is not a SwiGLU/GELU MLP that can be sliced; use granularity=1 for it")
            try:
                gate = build_gate(opts.gate, _d_model(module, ref), opts.total_experts, opts.active_experts, **opts.gate_options)
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


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the MoE layers' auxiliary losses from the last forward (add it to the task loss)."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())


@torch.no_grad()
def max_logit_diff(dense_fn: Callable[[torch.Tensor], torch.Tensor], moe_fn: Callable[[torch.Tensor], torch.Tensor], vocab_size: int, batch: int = 2, seq_len: int = 16, seed: int = 0) -> dict:
    """Run both models on the same random tokens: the max absolute and relative logit difference."""
    tokens = torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    a, b = dense_fn(tokens).double(), moe_fn(tokens).double()
    diff = (a - b).abs().max().item()
    scale = a.abs().max().item()
    return {"max_abs_diff": diff, "max_rel_diff": diff / max(scale, 1e-30), "max_abs_logit": scale, "tokens": list(tokens.shape)}
