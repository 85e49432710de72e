"""Hugging Face checkpoints on disk -> moeflow: reading folders, the Llama-family (dense) import.

Reads a local folder (config.json + model.safetensors, or shards listed in
model.safetensors.index.json); never downloads. Llama, Mistral, Qwen2 and Qwen3 map
exactly onto the moeflow `Transformer` (grouped-query heads, q/k/v biases, q/k norms).
Rotary layouts differ: Hugging Face rotates the two halves of a head, moeflow
interleaved pairs, so q and k rows are permuted within each head on the way in (and
back on the way out); q.k is unchanged because both get the same permutation.

The MoE architectures (Mixtral, Qwen2/3-MoE, OLMoE), both ways, live in `moeflow.moe.hf_moe`;
an upcycled Llama/Mistral exports as Mixtral, Qwen2 as Qwen2-MoE, Qwen3 as Qwen3-MoE (`FAMILIES`).
Other architectures (GPT-2, BERT, ...) go through the generic path, `moeflow.moe.upcycle.upcycle_model`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ConversionError
from .model import ModelConfig, Rotary, Transformer

# model_type -> exported MoE model_type
FAMILIES = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
GENERIC = ("gpt2",)  # handled by upcycle_model on the transformers module tree
SHARD_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# tensors some checkpoints carry that hold no weights
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# what a Hugging Face folder's tokenizer is made of (launch/tokenizer_files.py copies these too)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)
_COPY_FILES = (*TOKENIZER_FILES, "generation_config.json", "chat_template.jinja")


def supported_message(model_type: str | None) -> str:
    return (
        f"architecture {model_type!r} is not supported by the converters (supported: {', '.join(FAMILIES)}; "
        f"{', '.join(GENERIC)} via the generic path); for other models use `moeflow upcycle --generic` "
        "or `moeflow.moe.upcycle_model(model, num_experts, top_k)` on the loaded nn.Module"
    )


# --------------------------------------------------------------------------------------
# Reading a folder


@dataclass
class HFCheckpoint:
    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")


def read_config(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_dir():
        raise ConversionError(
            f"{p} is not a folder; pass a Hugging Face model folder (config.json + safetensors) or a moeflow checkpoint"
        )
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{p} has no config.json; pass the folder that `save_pretrained` wrote")
    try:
        return json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ConversionError(
            f"{cfg_file} is not valid JSON ({e}); restore the file from the original checkpoint"
        ) from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a folder, checking that every shard of an index is present."""
    index = path / SHARD_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ConversionError(f"{index} is unreadable ({e!r}); restore it from the original checkpoint") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ConversionError(f"{index} has no weight_map of file names; restore it from the original checkpoint")
        shards = sorted(set(weight_map.values()))
        outside = [s for s in shards if path.resolve() not in (path / s).resolve().parents]
        if outside:  # an index is data from elsewhere: it names files of this folder, nothing else
            raise ConversionError(
                f"{index} lists {outside[0]!r}, outside {path}; shards of a model folder sit inside it"
            )
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ConversionError(
                f"{path} is missing {len(missing)} of {len(shards)} shards listed in {SHARD_INDEX}: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; copy them into the folder"
            )
        return [path / s for s in shards]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ConversionError(
            f"{path} holds only pickle weights (.bin/.pt); re-save it with `save_pretrained(dir, safe_serialization=True)` to get safetensors"
        )
    raise ConversionError(
        f"{path} has no safetensors weights ({SINGLE_FILE} or {SHARD_INDEX}); pass a complete model folder"
    )


def read_checkpoint(path: str | Path, dtype: torch.dtype | None = torch.float32) -> HFCheckpoint:
    p = Path(path)
    config = read_config(p)
    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files(p):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    t = fh.get_tensor(k)
                    tensors[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except Exception as e:  # truncated/corrupt files raise several types
            raise ConversionError(f"{f} is unreadable ({e}); re-copy the file") from None
    return HFCheckpoint(p, config, tensors)


# --------------------------------------------------------------------------------------
# Llama family -> moeflow


def rope_config(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either the legacy keys (rope_theta/rope_scaling) or rope_parameters."""
    params = cfg.get("rope_parameters") or {}
    theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return theta, None
    return theta, dict(scaling)


def rotary_perm(head_dim: int) -> torch.Tensor:
    """moeflow row r of a head reads Hugging Face row perm[r]: (0, h/2, 1, h/2+1, ...)."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)


def _permute_heads(t: torch.Tensor, n_heads: int, head_dim: int, perm: torch.Tensor) -> torch.Tensor:
    shape = t.shape
    return t.reshape(n_heads, head_dim, *shape[1:])[:, perm].reshape(shape)


def model_config_from_hf(cfg: dict, tensors: dict[str, torch.Tensor], max_seq_len: int | None = None) -> ModelConfig:
    """The dense moeflow `ModelConfig` that represents this Llama-family checkpoint exactly."""
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        raise ConversionError(supported_message(mt))
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(
            f"hidden_act={act!r}: only SwiGLU (silu) MLPs convert exactly; use the generic path (`--generic`)"
        )
    if cfg.get("mlp_bias"):
        raise ConversionError("mlp_bias=true is not supported by the converter; use the generic path (`--generic`)")
    if any(k.endswith("self_attn.o_proj.bias") for k in tensors):
        raise ConversionError(
            "the checkpoint has attention output biases (o_proj.bias), which the moeflow model does not represent; use the generic path (`--generic`)"
        )
    try:
        d, L, H = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
        F_, V = int(cfg["intermediate_size"]), int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"config.json lacks a usable {e} entry; restore the original config.json") from None
    head_dim = int(cfg.get("head_dim") or d // H)
    theta, scaling = rope_config(cfg)
    limit = int(cfg.get("max_position_embeddings", 2048))
    window = cfg.get("sliding_window") if (mt != "qwen2" or cfg.get("use_sliding_window")) else None
    if window:
        limit = min(limit, int(window))  # full causal attention == sliding window up to the window
    seq = min(limit, max_seq_len) if max_seq_len else min(limit, 4096)
    tied = bool(cfg.get("tie_word_embeddings", False))
    try:
        return ModelConfig(
            vocab_size=V,
            d_model=d,
            n_layers=L,
            n_heads=H,
            max_seq_len=seq,
            d_ff=F_,
            dense_d_ff=F_,
            num_experts=1,
            top_k=1,
            moe_every=0,
            activation="swiglu",
            rope_theta=theta,
            rope_scaling=scaling,
            n_kv_heads=int(cfg.get("num_key_value_heads") or H),
            head_dim=head_dim if head_dim * H != d else None,
            attn_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
            qk_norm="model.layers.0.self_attn.q_norm.weight" in tensors,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=tied,
        )
    except ValueError as e:
        raise ConversionError(f"config.json describes a model moeflow cannot build: {e}") from None


def _expected_hf(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, H, KV, hd, F_ = (
        model_cfg.d_model,
        model_cfg.n_heads,
        model_cfg.kv_heads,
        model_cfg.head_size,
        model_cfg.dense_d_ff,
    )
    shapes = {
        "model.embed_tokens.weight": (model_cfg.vocab_size, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (model_cfg.vocab_size, d),
    }
    for i in range(model_cfg.n_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (H * hd, d),
                p + "self_attn.k_proj.weight": (KV * hd, d),
                p + "self_attn.v_proj.weight": (KV * hd, d),
                p + "self_attn.o_proj.weight": (d, H * hd),
                p + "mlp.gate_proj.weight": (F_, d),
                p + "mlp.up_proj.weight": (F_, d),
                p + "mlp.down_proj.weight": (d, F_),
            }
        )
        if model_cfg.attn_bias:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (H * hd,),
                    p + "self_attn.k_proj.bias": (KV * hd,),
                    p + "self_attn.v_proj.bias": (KV * hd,),
                }
            )
        if model_cfg.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    return shapes


def check_weights(model_cfg: ModelConfig, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Names and shapes against config.json; resolves tied embeddings explicitly. Returns the tensors to use."""
    tensors = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES)}
    expected = _expected_hf(model_cfg)
    if model_cfg.tie_embeddings:
        if "lm_head.weight" in tensors and not torch.equal(
            tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight", tensors["lm_head.weight"])
        ):
            raise ConversionError(
                f"{path}/config.json says tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight; set tie_word_embeddings to false in config.json"
            )
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
        expected.pop("lm_head.weight")
    elif "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        raise ConversionError(
            f"{path} has no lm_head.weight and config.json says tie_word_embeddings=false; if the model shares its input and output embeddings, set tie_word_embeddings to true"
        )
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: {tuple(tensors[k].shape)} vs config {expected[k]}"
        for k in sorted(expected)
        if k in tensors and tuple(tensors[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"shapes differ ({'; '.join(wrong[:3])})")
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise ConversionError(
            f"the weights in {path} do not match its config.json ({model_type_of(model_cfg)}): {'; '.join(parts)}; use the config.json that was saved with these weights"
        )
    return tensors


def model_type_of(model_cfg: ModelConfig) -> str:
    return f"{model_cfg.n_layers} layers, hidden {model_cfg.d_model}, {model_cfg.n_heads} heads/{model_cfg.kv_heads} kv, MLP {model_cfg.dense_d_ff}"


def qk_norm_perm(model_cfg: ModelConfig, n_heads: int, perm: torch.Tensor) -> torch.Tensor:
    """Index of a q/k norm weight: within one head (Qwen3) or within each head of the projection (OLMoE)."""
    if model_cfg.qk_norm_scope == "head":
        return perm
    hd = model_cfg.head_size
    return (torch.arange(n_heads)[:, None] * hd + perm[None, :]).reshape(-1)


def attention_to_moeflow(model_cfg: ModelConfig, tensors: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Block i's attention and norms: Hugging Face Llama-style names -> moeflow names."""
    hd, H, KV = model_cfg.head_size, model_cfg.n_heads, model_cfg.kv_heads
    perm = rotary_perm(hd)
    p, b = f"model.layers.{i}.", f"blocks.{i}."
    out = {}
    q = _permute_heads(tensors[p + "self_attn.q_proj.weight"], H, hd, perm)
    k = _permute_heads(tensors[p + "self_attn.k_proj.weight"], KV, hd, perm)
    out[b + "attn.qkv.weight"] = torch.cat([q, k, tensors[p + "self_attn.v_proj.weight"]])
    if model_cfg.attn_bias:
        qb = _permute_heads(tensors[p + "self_attn.q_proj.bias"], H, hd, perm)
        kb = _permute_heads(tensors[p + "self_attn.k_proj.bias"], KV, hd, perm)
        out[b + "attn.qkv.bias"] = torch.cat([qb, kb, tensors[p + "self_attn.v_proj.bias"]])
    if model_cfg.qk_norm:
        out[b + "attn.q_norm.weight"] = tensors[p + "self_attn.q_norm.weight"][qk_norm_perm(model_cfg, H, perm)]
        out[b + "attn.k_norm.weight"] = tensors[p + "self_attn.k_norm.weight"][qk_norm_perm(model_cfg, KV, perm)]
    out[b + "attn.out.weight"] = tensors[p + "self_attn.o_proj.weight"]
    out[b + "attn_norm.weight"] = tensors[p + "input_layernorm.weight"]
    out[b + "ffn_norm.weight"] = tensors[p + "post_attention_layernorm.weight"]
    return out


def attention_to_hf(model_cfg: ModelConfig, sd: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """The inverse of `attention_to_moeflow`."""
    hd, H, KV = model_cfg.head_size, model_cfg.n_heads, model_cfg.kv_heads
    inv = torch.argsort(rotary_perm(hd))
    p, b = f"model.layers.{i}.", f"blocks.{i}."
    out = {}
    q, k, v = sd[b + "attn.qkv.weight"].split([H * hd, KV * hd, KV * hd])
    out[p + "self_attn.q_proj.weight"] = _permute_heads(q, H, hd, inv)
    out[p + "self_attn.k_proj.weight"] = _permute_heads(k, KV, hd, inv)
    out[p + "self_attn.v_proj.weight"] = v
    if model_cfg.attn_bias:
        qb, kb, vb = sd[b + "attn.qkv.bias"].split([H * hd, KV * hd, KV * hd])
        out[p + "self_attn.q_proj.bias"] = _permute_heads(qb, H, hd, inv)
        out[p + "self_attn.k_proj.bias"] = _permute_heads(kb, KV, hd, inv)
        out[p + "self_attn.v_proj.bias"] = vb
    if model_cfg.qk_norm:
        out[p + "self_attn.q_norm.weight"] = sd[b + "attn.q_norm.weight"][qk_norm_perm(model_cfg, H, inv)]
        out[p + "self_attn.k_norm.weight"] = sd[b + "attn.k_norm.weight"][qk_norm_perm(model_cfg, KV, inv)]
    out[p + "self_attn.o_proj.weight"] = sd[b + "attn.out.weight"]
    out[p + "input_layernorm.weight"] = sd[b + "attn_norm.weight"]
    out[p + "post_attention_layernorm.weight"] = sd[b + "ffn_norm.weight"]
    return out


def hf_to_moeflow_state(model_cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Llama-family tensors -> the state dict of a dense moeflow `Transformer`."""
    out = {"embed.weight": tensors["model.embed_tokens.weight"], "norm.weight": tensors["model.norm.weight"]}
    out["lm_head.weight"] = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    for i in range(model_cfg.n_layers):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        out.update(attention_to_moeflow(model_cfg, tensors, i))
        out[b + "ffn.w1.weight"] = tensors[p + "mlp.gate_proj.weight"]
        out[b + "ffn.w3.weight"] = tensors[p + "mlp.up_proj.weight"]
        out[b + "ffn.w2.weight"] = tensors[p + "mlp.down_proj.weight"]
    return out


def load_dense(
    path: str | Path, max_seq_len: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Transformer, HFCheckpoint]:
    """A Llama-family Hugging Face folder as a dense moeflow `Transformer` (same function)."""
    ckpt = read_checkpoint(path, dtype)
    model_cfg = model_config_from_hf(ckpt.config, ckpt.tensors, max_seq_len)
    tensors = check_weights(model_cfg, ckpt.tensors, ckpt.path)
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.load_state_dict(hf_to_moeflow_state(model_cfg, tensors), assign=True, strict=True)
    for block in model.blocks:  # non-persistent rotary tables were built on the meta device
        block.attn.rotary = Rotary(
            model_cfg.head_size, model_cfg.max_seq_len, model_cfg.rope_theta, model_cfg.rope_scaling
        )
    if model_cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.to(dtype).eval(), ckpt


def save_hf(
    folder: Path, config: dict, tensors: dict[str, torch.Tensor], source: Path | None = None, shard_gib: float = 5.0
) -> None:
    """config.json + safetensors (sharded with an index past `shard_gib`, as `save_pretrained` does)
    (+ the source's tokenizer files) into an existing folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= shard_gib * 2**30:
        save_file(tensors, str(folder / SINGLE_FILE), metadata={"format": "pt"})
    else:
        from huggingface_hub import split_torch_state_dict_into_shards  # comes with transformers

        split = split_torch_state_dict_into_shards(tensors, max_shard_size=int(shard_gib * 2**30))
        for filename, names in split.filename_to_tensors.items():
            save_file({n: tensors[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
        index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
        (folder / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if source is not None:
        for name in _COPY_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, folder / name)


def dtype_of(cfg: dict) -> torch.dtype:
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        str(name).replace("torch.", ""), torch.float32
    )


# --------------------------------------------------------------------------------------
# The generic path on a transformers model (GPT-2, BERT, anything transformers loads)

UPCYCLE_RECIPE = "upcycle.json"


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """A local folder through `transformers.AutoModelForCausalLM` (no download), in eval mode."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ConversionError("this needs transformers: pip install 'moeflow[hf]'") from None
    weight_files(Path(path))  # missing shards etc. as one-line errors before transformers sees them
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype).eval()
    except (OSError, ValueError, KeyError) as e:
        raise ConversionError(f"transformers cannot load {path}: {' '.join(str(e).split())[:300]}") from None


def save_generic(folder: Path, model: torch.nn.Module, source: Path, recipe: dict) -> None:
    """An upcycled transformers model: the dense config.json, the upcycle recipe, all weights."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "config.json", folder / "config.json")
    (folder / UPCYCLE_RECIPE).write_text(json.dumps(recipe, indent=2) + "\n")
    save_model(model, str(folder / SINGLE_FILE), metadata={"format": "pt", "moeflow": "upcycled"})
    for name in _COPY_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


def load_upcycled(path: str | Path, dtype: torch.dtype = torch.float32):
    """Rebuild a model saved by the generic path: dense architecture, same upcycling, saved weights."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from .upcycle import UpcycleOptions, upcycle_model

    p = Path(path)
    if not (p / UPCYCLE_RECIPE).is_file():
        raise ConversionError(f"{p} has no {UPCYCLE_RECIPE}; it was not written by the generic upcycle path")
    recipe = json.loads((p / UPCYCLE_RECIPE).read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(p), local_files_only=True)).to(dtype)
    upcycle_model(model, options=UpcycleOptions(**recipe["options"]), selector=recipe.get("selector"))
    missing, unexpected = load_model(model, str(p / SINGLE_FILE), strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise ConversionError(
            f"{p}: saved weights do not match the rebuilt model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval()


__all__ = [
    "FAMILIES",
    "GENERIC",
    "ConversionError",
    "HFCheckpoint",
    "read_config",
    "read_checkpoint",
    "weight_files",
    "model_config_from_hf",
    "check_weights",
    "hf_to_moeflow_state",
    "attention_to_moeflow",
    "attention_to_hf",
    "load_dense",
    "save_hf",
    "rotary_perm",
    "supported_message",
    "dtype_of",
    "load_hf_model",
    "save_generic",
    "load_upcycled",
]
