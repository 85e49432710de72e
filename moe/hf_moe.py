"""Hugging Face MoE architectures <-> moeflow: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE, both ways.

Each architecture is a moeflow `Transformer` with the `topk` gate (softmax scores, top-k,
renormalised or not) and options of the attention the Llama family already uses (see
`moeflow.moe.hf_convert`): Qwen2-MoE adds a shared expert scaled by a per-token sigmoid
gate, Qwen3-MoE per-head q/k norms, OLMoE q/k norms over the whole projection.

An export is exact or refused: `export_blockers` names every option of a moeflow model that
the target architecture cannot compute (sigmoid scores, capacity dropping, group-limited
routing, expert-bias balancing, ...), and the converters compare logits with transformers'
own model before anything is written (`moeflow.launch.hf_models`).

DeepSeek-V2/V3 are refused on import: their multi-head latent attention (keys and values
from a low-rank latent, a separate rotary part) is not moeflow's attention, so no exact
moeflow model exists. Their routing is expressible (`gate=deepseek_v3`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .hf_convert import (
    _IGNORED_SUFFIXES,
    ConversionError,
    HFCheckpoint,
    attention_to_hf,
    attention_to_moeflow,
    rope_config,
)
from .model import Rotary, Transformer


@dataclass(frozen=True)
class Arch:
    """Where an architecture keeps its MoE tensors and how its config names them."""

    cls: str
    moe_prefix: str  # under model.layers.i.
    expert_names: tuple[str, str, str]  # gate (w1), up (w3), down (w2) projections
    num_experts_keys: tuple[str, ...]  # the first present wins (transformers renamed some across versions)
    expert_ff_key: str


ARCHS = {
    "mixtral": Arch(
        "MixtralForCausalLM", "block_sparse_moe.", ("w1", "w3", "w2"), ("num_local_experts",), "intermediate_size"
    ),
    "qwen2_moe": Arch(
        "Qwen2MoeForCausalLM",
        "mlp.",
        ("gate_proj", "up_proj", "down_proj"),
        ("num_experts", "num_local_experts"),
        "moe_intermediate_size",
    ),
    "qwen3_moe": Arch(
        "Qwen3MoeForCausalLM",
        "mlp.",
        ("gate_proj", "up_proj", "down_proj"),
        ("num_experts", "num_local_experts"),
        "moe_intermediate_size",
    ),
    "olmoe": Arch(
        "OlmoeForCausalLM",
        "mlp.",
        ("gate_proj", "up_proj", "down_proj"),
        ("num_experts", "num_local_experts"),
        "intermediate_size",
    ),
}
REFUSED = {
    "deepseek_v2": "its multi-head latent attention (k/v from a low-rank latent with a decoupled rotary part) is not moeflow's attention, so no exact moeflow model exists",
    "deepseek_v3": "its multi-head latent attention (k/v from a low-rank latent with a decoupled rotary part) is not moeflow's attention, so no exact moeflow model exists",
}


def unsupported(model_type: str | None) -> ConversionError:
    why = f" ({REFUSED[model_type]})" if model_type in REFUSED else ""
    return ConversionError(
        f"architecture {model_type!r} cannot be imported{why}; supported MoE architectures: {', '.join(ARCHS)} (dense Llama/Mistral/Qwen2/Qwen3 models: `moeflow upcycle`)"
    )


# --------------------------------------------------------------------------------------
# Import


def _int(cfg: dict, key: str, default=None) -> int:
    value = cfg.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConversionError(
            f"config.json lacks a usable {key!r} entry (got {value!r}); restore the original config.json"
        ) from None


def moe_config_from_hf(cfg: dict, tensors: dict[str, torch.Tensor], max_seq_len: int | None = None) -> ModelConfig:
    """The moeflow `ModelConfig` that computes this Hugging Face MoE model exactly, or a one-line refusal."""
    mt = cfg.get("model_type")
    if mt not in ARCHS:
        raise unsupported(mt)
    arch = ARCHS[mt]
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act={cfg.get('hidden_act')!r}: only SwiGLU (silu) experts convert exactly")
    if cfg.get("clip_qkv") is not None:
        raise ConversionError(f"clip_qkv={cfg['clip_qkv']}: moeflow's attention does not clamp q/k/v; no exact import")
    if any(k.endswith("self_attn.o_proj.bias") for k in tensors):
        raise ConversionError(
            "the checkpoint has attention output biases (o_proj.bias), which moeflow's attention does not have"
        )
    if cfg.get("mlp_only_layers"):
        raise ConversionError(
            f"mlp_only_layers={cfg['mlp_only_layers']}: moeflow places dense layers every model.moe_every blocks only, not at a list of positions"
        )
    d, L, H, V = (
        _int(cfg, "hidden_size"),
        _int(cfg, "num_hidden_layers"),
        _int(cfg, "num_attention_heads"),
        _int(cfg, "vocab_size"),
    )
    experts_key = next((k for k in arch.num_experts_keys if cfg.get(k) is not None), arch.num_experts_keys[0])
    E, K, F_ = _int(cfg, experts_key), _int(cfg, "num_experts_per_tok"), _int(cfg, arch.expert_ff_key)
    head_dim = int(cfg.get("head_dim") or d // H)
    theta, scaling = rope_config(cfg)
    limit = _int(cfg, "max_position_embeddings", 4096)
    windowed = cfg.get("use_sliding_window", mt == "mixtral")
    if windowed and cfg.get("sliding_window"):
        limit = min(limit, int(cfg["sliding_window"]))  # full causal attention == sliding window up to the window
    shared_ff = _int(cfg, "shared_expert_intermediate_size", 0) if mt == "qwen2_moe" else 0
    sparse_step = _int(cfg, "decoder_sparse_step", 1) if mt in ("qwen2_moe", "qwen3_moe") else 1
    renormalize = True if mt == "mixtral" else bool(cfg.get("norm_topk_prob", False))
    gate = {
        "name": "topk",
        "score_func": "softmax",
        "renormalize": renormalize,
        "aux_loss_coef": float(cfg.get("router_aux_loss_coef", 0.01)),
    }
    try:
        return ModelConfig(
            vocab_size=V,
            d_model=d,
            n_layers=L,
            n_heads=H,
            max_seq_len=min(limit, max_seq_len or 4096),
            d_ff=F_,
            dense_d_ff=_int(cfg, "intermediate_size") if sparse_step > 1 else None,
            num_experts=E,
            top_k=K,
            moe_every=sparse_step,
            activation="swiglu",
            shared_experts=1 if shared_ff else 0,
            shared_d_ff=shared_ff or None,
            shared_expert_gate=bool(shared_ff),
            rope_theta=theta,
            rope_scaling=scaling,
            n_kv_heads=int(cfg.get("num_key_value_heads") or H),
            head_dim=head_dim if head_dim * H != d else None,
            attn_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
            qk_norm="model.layers.0.self_attn.q_norm.weight" in tensors,
            qk_norm_scope="proj" if mt == "olmoe" else "head",
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            gate=gate,
        )
    except ValueError as e:
        raise ConversionError(f"config.json describes a model moeflow cannot build: {e}") from None


class LazyTensors(Mapping):
    """The tensors of a Hugging Face folder by name, each read from its safetensors file when asked
    (so an import holds one layer at a time, never the whole model)."""

    def __init__(self, path: str | Path, dtype: torch.dtype | None = torch.float32):
        from safetensors import safe_open

        from .hf_convert import weight_files

        self.dtype, self._where, self._open = dtype, {}, {}
        for f in weight_files(Path(path)):
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as e:  # truncated/corrupt files raise several types
                raise ConversionError(f"{f} is unreadable ({e}); re-copy the file") from None
            self._open[f] = handle
            self._where.update({k: f for k in handle.keys()})

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            t = self._open[self._where[key]].get_tensor(key)
        except KeyError:
            raise
        except Exception as e:
            raise ConversionError(f"{self._where[key]} is unreadable at {key} ({e}); re-copy the file") from None
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def nbytes(self) -> int:
        return sum(int(np.prod(self._open[f].get_slice(k).get_shape())) for k, f in self._where.items()) * 4


class _Taken(Mapping):
    """A view of the checkpoint's tensors that remembers which were used (the rest are unexpected)."""

    def __init__(self, tensors: Mapping):
        self.tensors = tensors
        self.used: set[str] = set()

    def __getitem__(self, key):
        if key not in self.tensors:
            raise ConversionError(
                f"the weights do not match config.json: {key} is missing; use the config.json saved with these weights"
            )
        self.used.add(key)
        return self.tensors[key]

    def __contains__(self, key) -> bool:
        return key in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def iter_moeflow_tensors(model_cfg: ModelConfig, tensors: Mapping, model_type: str, check_unused: bool = True):
    """(moeflow name, tensor) pairs, block by block; names every missing or unexpected tensor at the end."""
    arch = ARCHS[model_type]
    t = _Taken(_Filtered(tensors))
    yield "embed.weight", t["model.embed_tokens.weight"]
    if not model_cfg.tie_embeddings:
        yield "lm_head.weight", t["lm_head.weight"]
    elif "lm_head.weight" in t:  # some tied checkpoints store the copy too
        t.used.add("lm_head.weight")
    g, u, dn = arch.expert_names
    for i in range(model_cfg.n_layers):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        yield from attention_to_moeflow(model_cfg, t, i).items()
        if not model_cfg.is_moe_block(i):
            for mine, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                yield b + f"ffn.{mine}.weight", t[p + f"mlp.{theirs}.weight"]
            continue
        m = p + arch.moe_prefix
        yield b + "ffn.gate.proj.weight", t[m + "gate.weight"]
        experts = range(model_cfg.num_experts)
        yield b + "ffn.experts.w1_EDF", torch.stack([t[f"{m}experts.{e}.{g}.weight"].t() for e in experts])
        yield b + "ffn.experts.w3_EDF", torch.stack([t[f"{m}experts.{e}.{u}.weight"].t() for e in experts])
        yield b + "ffn.experts.w2_EFD", torch.stack([t[f"{m}experts.{e}.{dn}.weight"].t() for e in experts])
        if model_cfg.shared_experts:
            for mine, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                yield b + f"ffn.shared_expert.{mine}.weight", t[m + f"shared_expert.{theirs}.weight"]
            yield b + "ffn.shared_expert.gate.weight", t[m + "shared_expert_gate.weight"]
    yield "norm.weight", t["model.norm.weight"]
    unexpected = sorted(set(t) - t.used) if check_unused else []
    if unexpected:
        raise ConversionError(
            f"the weights do not match config.json ({model_type}): unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}; use the config.json saved with these weights"
        )


class _Filtered(Mapping):
    """The tensors without the ones that hold no weights (rotary tables some checkpoints carry)."""

    def __init__(self, tensors: Mapping):
        self.tensors, self.keys_ = tensors, [k for k in tensors if not k.endswith(_IGNORED_SUFFIXES)]

    def __getitem__(self, key):
        return self.tensors[key]

    def __contains__(self, key) -> bool:
        return key in self.tensors and not key.endswith(_IGNORED_SUFFIXES)

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def hf_moe_to_moeflow_state(model_cfg: ModelConfig, tensors: Mapping, model_type: str) -> dict[str, torch.Tensor]:
    """Hugging Face MoE tensors -> a moeflow state dict (all in memory: small models, tests)."""
    return dict(iter_moeflow_tensors(model_cfg, tensors, model_type))


def build_from_state(
    model_cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> Transformer:
    """A moeflow model holding exactly `state` (shapes checked, in one line)."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    try:
        model.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as e:
        first = next(
            (
                line.strip()
                for line in str(e).splitlines()
                if "size mismatch" in line or "Missing" in line or "Unexpected" in line
            ),
            str(e)[:300],
        )
        raise ConversionError(
            f"the weights do not fit the shapes in config.json: {first}; use the config.json saved with these weights"
        ) from None
    for block in model.blocks:  # non-persistent rotary tables were built on the meta device
        block.attn.rotary = Rotary(
            model_cfg.head_size, model_cfg.max_seq_len, model_cfg.rope_theta, model_cfg.rope_scaling
        )
    if model_cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.to(dtype).eval()


def load_moe(
    path: str | Path, max_seq_len: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Transformer, HFCheckpoint]:
    """A Hugging Face MoE folder as a moeflow `Transformer` computing the same function (in memory)."""
    cfg, tensors = open_moe(path, dtype)
    model_cfg = moe_config_from_hf(cfg, tensors, max_seq_len)
    state = hf_moe_to_moeflow_state(model_cfg, tensors, cfg["model_type"])
    return build_from_state(model_cfg, state, dtype), HFCheckpoint(Path(path), cfg, {})


def open_moe(path: str | Path, dtype: torch.dtype | None = torch.float32) -> tuple[dict, LazyTensors]:
    """config.json (architecture checked before any weights are touched) and the lazy tensors."""
    from .hf_convert import read_config

    cfg = read_config(path)
    if cfg.get("model_type") not in ARCHS:
        raise unsupported(cfg.get("model_type"))
    return cfg, LazyTensors(path, dtype)


# --------------------------------------------------------------------------------------
# Export


def export_blockers(model_cfg: ModelConfig, target: str) -> list[str]:
    """Every option of `model_cfg` that `target` cannot compute, each naming the option; [] = exact."""
    if target not in ARCHS:
        return [f"target {target!r} is unknown; choose one of {', '.join(ARCHS)}"]
    gate, g = model_cfg.gate.get("name"), model_cfg.gate
    out = []
    if gate != "topk":
        out.append(f"gate={gate}: {target} routes each token to its top-k softmax experts; train with gate=topk")
    else:
        if g.get("score_func", "softmax") != "softmax":
            out.append(f"gate.score_func={g.get('score_func')}: {target} scores experts with a softmax")
        if not g.get("dropless", True):
            out.append(f"gate.dropless=false (capacity dropping): {target} never drops tokens")
        if g.get("n_groups") is not None or g.get("topk_groups") is not None:
            out.append(f"gate.n_groups/gate.topk_groups (group-limited routing): {target} picks from all experts")
        if g.get("bias_update_rate", 0.0) > 0:
            out.append(
                f"gate.bias_update_rate={g.get('bias_update_rate')} (expert-bias balancing changes which experts are picked): {target} has no expert bias"
            )
        renorm = g.get("renormalize", True) or g.get("topk_before_softmax", False)
        if target == "mixtral" and not renorm:
            out.append(
                "gate.renormalize=false: Mixtral always renormalises the top-k weights; export as qwen3_moe or olmoe (norm_topk_prob=false)"
            )
    if model_cfg.activation != "swiglu":
        out.append(f"model.activation={model_cfg.activation}: {target} experts are SwiGLU")
    if model_cfg.moe_every != 1 and target in ("mixtral", "olmoe"):
        out.append(f"model.moe_every={model_cfg.moe_every} (dense layers): every {target} layer is MoE")
    if model_cfg.moe_every == 0:
        out.append("model.moe_every=0 (a dense model): export it as its dense architecture instead")
    if model_cfg.shared_experts and target != "qwen2_moe":
        out.append(
            f"model.shared_experts={model_cfg.shared_experts}: {target} has no shared expert (qwen2_moe has one)"
        )
    if model_cfg.attn_bias and target not in ("qwen2_moe",):
        out.append(f"model.attn_bias=true: {target} has no q/k/v biases (qwen2_moe has them)")
    want_norm = {"qwen3_moe": "head", "olmoe": "proj"}.get(target)
    have_norm = model_cfg.qk_norm_scope if model_cfg.qk_norm else None
    if have_norm != want_norm:
        need_text = {
            "head": "q/k norms per head (model.qk_norm=true)",
            "proj": "q/k norms over the projection (model.qk_norm_scope=proj)",
            None: "no q/k norms",
        }
        out.append(
            f"model.qk_norm={model_cfg.qk_norm} qk_norm_scope={model_cfg.qk_norm_scope}: {target} has {need_text[want_norm]}"
        )
    if model_cfg.shared_expert_gate and target != "qwen2_moe":
        out.append(f"model.shared_expert_gate=true: {target} has no gated shared expert")
    return out


def auto_target(model_cfg: ModelConfig) -> str:
    """The architecture a model's layers point to (`export_blockers` then says whether it fits exactly)."""
    if model_cfg.qk_norm:
        return "olmoe" if model_cfg.qk_norm_scope == "proj" else "qwen3_moe"
    g = model_cfg.gate
    renorm = g.get("renormalize", True) or g.get("topk_before_softmax", False)
    plain = model_cfg.moe_every == 1 and not model_cfg.shared_experts and not model_cfg.attn_bias
    return (
        "mixtral" if plain and renorm else "qwen2_moe"
    )  # Qwen2-MoE: biases, shared expert, dense layers, either weighting


def check_exportable(model_cfg: ModelConfig, target: str) -> None:
    blockers = export_blockers(model_cfg, target)
    if blockers:
        raise ConversionError(f"this model cannot be exported as {target} exactly: {'; '.join(blockers)}")


def export_config(model_cfg: ModelConfig, target: str, source_cfg: dict | None = None) -> dict:
    """config.json of the `target` model equivalent to a moeflow model (refuses what it cannot express)."""
    check_exportable(model_cfg, target)
    src = source_cfg or {}
    g = model_cfg.gate
    cfg = {
        "architectures": [ARCHS[target].cls],
        "model_type": target,
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.d_model,
        "num_hidden_layers": model_cfg.n_layers,
        "num_attention_heads": model_cfg.n_heads,
        "num_key_value_heads": model_cfg.kv_heads,
        "head_dim": model_cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": int(src.get("max_position_embeddings", model_cfg.max_seq_len)),
        "rms_norm_eps": model_cfg.norm_eps,
        "rope_theta": model_cfg.rope_theta,
        "rope_scaling": model_cfg.rope_scaling,
        "tie_word_embeddings": model_cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "num_experts_per_tok": model_cfg.top_k,
        "router_aux_loss_coef": float(g.get("aux_loss_coef", 0.01)),
        "output_router_logits": False,
        "initializer_range": model_cfg.init_std,
        "torch_dtype": src.get("torch_dtype", src.get("dtype", "float32")),
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        cfg[key] = src.get(key)  # absent: none (the architectures' defaults may lie outside a small vocab)
    renorm = bool(g.get("renormalize", True) or g.get("topk_before_softmax", False))
    if target == "mixtral":
        cfg.update(
            num_local_experts=model_cfg.num_experts,
            intermediate_size=model_cfg.d_ff,
            sliding_window=src.get("sliding_window"),
            router_jitter_noise=0.0,
        )
    elif target == "olmoe":
        cfg.update(
            num_experts=model_cfg.num_experts,
            intermediate_size=model_cfg.d_ff,
            norm_topk_prob=renorm,
            clip_qkv=None,
            attention_bias=False,
        )
    else:
        cfg.update(
            num_experts=model_cfg.num_experts,
            moe_intermediate_size=model_cfg.d_ff,
            intermediate_size=model_cfg.dense_d_ff or model_cfg.d_ff * model_cfg.top_k,
            decoder_sparse_step=model_cfg.moe_every,
            mlp_only_layers=[],
            norm_topk_prob=renorm,
            use_sliding_window=bool(src.get("use_sliding_window", False)),
            sliding_window=src.get("sliding_window"),
            max_window_layers=src.get("max_window_layers", model_cfg.n_layers),
            attention_bias=False,
        )
        if target == "qwen2_moe":
            cfg.update(shared_expert_intermediate_size=model_cfg.shared_hidden, qkv_bias=model_cfg.attn_bias)
    return cfg


@torch.no_grad()
def export_tensors(model: Transformer, target: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Per-expert tensors in the published layout of `target`."""
    model_cfg = model.cfg
    check_exportable(model_cfg, target)
    arch = ARCHS[target]
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not model_cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    g, u, dn = arch.expert_names
    for i, block in enumerate(model.blocks):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        out.update(attention_to_hf(model_cfg, sd, i))
        if not model_cfg.is_moe_block(i):
            for mine, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[p + f"mlp.{theirs}.weight"] = sd[b + f"ffn.{mine}.weight"]
            continue
        if block.ffn.experts.b1_EF is not None:
            raise ConversionError(
                "experts with biases (an upcycled GPT-2) have no Hugging Face MoE equivalent; keep the moeflow format"
            )
        m = p + arch.moe_prefix
        out[m + "gate.weight"] = sd[b + "ffn.gate.proj.weight"]
        for e in range(model_cfg.num_experts):
            out[f"{m}experts.{e}.{g}.weight"] = sd[b + "ffn.experts.w1_EDF"][e].t()
            out[f"{m}experts.{e}.{u}.weight"] = sd[b + "ffn.experts.w3_EDF"][e].t()
            out[f"{m}experts.{e}.{dn}.weight"] = sd[b + "ffn.experts.w2_EFD"][e].t()
        if target == "qwen2_moe":
            out.update(_qwen2_shared_expert(model_cfg, sd, b, m))
    cast = (lambda t: t.detach().to("cpu", dtype)) if dtype is not None else (lambda t: t.detach().to("cpu"))  # noqa: E731
    return {k: cast(v).contiguous() for k, v in out.items()}


def _qwen2_shared_expert(model_cfg: ModelConfig, sd: dict, b: str, m: str) -> dict[str, torch.Tensor]:
    """Qwen2-MoE always has a gated shared expert: copy ours, or express an ungated one / none exactly."""
    out = {}
    if not model_cfg.shared_experts:  # a zero-width shared expert adds nothing
        out[m + "shared_expert.gate_proj.weight"] = torch.zeros(0, model_cfg.d_model)
        out[m + "shared_expert.up_proj.weight"] = torch.zeros(0, model_cfg.d_model)
        out[m + "shared_expert.down_proj.weight"] = torch.zeros(model_cfg.d_model, 0)
        out[m + "shared_expert_gate.weight"] = torch.zeros(1, model_cfg.d_model)
        return out
    out[m + "shared_expert.gate_proj.weight"] = sd[b + "ffn.shared_expert.w1.weight"]
    out[m + "shared_expert.up_proj.weight"] = sd[b + "ffn.shared_expert.w3.weight"]
    if model_cfg.shared_expert_gate:
        out[m + "shared_expert.down_proj.weight"] = sd[b + "ffn.shared_expert.w2.weight"]
        out[m + "shared_expert_gate.weight"] = sd[b + "ffn.shared_expert.gate.weight"]
    else:  # an ungated expert: a zero gate gives sigmoid(0) = 1/2, so the down projection doubles
        out[m + "shared_expert.down_proj.weight"] = sd[b + "ffn.shared_expert.w2.weight"] * 2
        out[m + "shared_expert_gate.weight"] = torch.zeros(1, model_cfg.d_model)
    return out


__all__ = [
    "ARCHS",
    "REFUSED",
    "moe_config_from_hf",
    "hf_moe_to_moeflow_state",
    "iter_moeflow_tensors",
    "LazyTensors",
    "open_moe",
    "build_from_state",
    "load_moe",
    "export_blockers",
    "auto_target",
    "check_exportable",
    "export_config",
    "export_tensors",
    "unsupported",
]
