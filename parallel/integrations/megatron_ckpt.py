"""Move weights between moeflow checkpoints and megatron-core GPT/MoE checkpoints.

Pure tensor re-layout (no megatron-core import needed). Megatron-core's names, for a GPT
model built from its local or Transformer-Engine layer specs:

| moeflow `Transformer`                 | megatron-core `GPTModel`                                         |
|---------------------------------------|------------------------------------------------------------------|
| embed.weight                          | embedding.word_embeddings.weight                                 |
| blocks.i.attn_norm.weight             | decoder.layers.i.input_layernorm.weight (TE: self_attention.linear_qkv.layer_norm_weight) |
| blocks.i.attn.qkv.weight [q|k|v] rows | decoder.layers.i.self_attention.linear_qkv.weight, rows per query group [q heads|k|v] |
| blocks.i.attn.out.weight              | decoder.layers.i.self_attention.linear_proj.weight               |
| blocks.i.ffn_norm.weight              | decoder.layers.i.pre_mlp_layernorm.weight (TE dense: mlp.linear_fc1.layer_norm_weight) |
| blocks.i.ffn.w1/w3/w2 (dense)         | mlp.linear_fc1.weight = [w1; w3], mlp.linear_fc2.weight = w2      |
| blocks.i.ffn.gate.proj.weight [E, D]  | mlp.router.weight [E, D]   (top-k softmax gate)                  |
| blocks.i.ffn.experts.w1_EDF/w3_EDF/w2_EFD | experts, three layouts:                                      |
|   sequential (SequentialMLP)          |   mlp.experts.local_experts.e.linear_fc1.weight [2F, D] = [w1_e^T; w3_e^T], linear_fc2.weight [D, F] = w2_e^T |
|   te_grouped (TEGroupedMLP)           |   mlp.experts.linear_fc1.weight{e}, mlp.experts.linear_fc2.weight{e} (same per-expert matrices) |
|   grouped (legacy GroupedMLP)         |   mlp.experts.weight1 [D, E*2F] (memory = E x [D, 2F] = [w1_e | w3_e]), weight2 [E*F, D] (= E x [F, D]) |
| blocks.i.ffn.shared_expert.w1/w3/w2   | mlp.shared_experts.linear_fc1.weight / linear_fc2.weight          |
| norm.weight                           | decoder.final_layernorm.weight                                   |
| lm_head.weight (absent when tied)     | output_layer.weight                                              |

A megatron model built with `megatron_core.gpt_layer_specs` (moeflow's MoE inside
megatron) keeps moeflow's own MoE names under `mlp.moe.`; `native=False` maps that.

The router: `router_config(model_cfg)` gives the TransformerConfig fields (moe_router_*,
moe_expert_capacity_factor, ...) under which megatron-core's TopKRouter routes like
moeflow's `topk` gate, and refuses, naming the option, what it cannot reproduce. The
aux-loss-free expert bias travels as `mlp.router.expert_bias`.

Files: megatron's torch-format checkpoints (`<dir>/iter_0000100/mp_rank_00/model_optim_rng.pt`
holding {"model": state_dict, "iteration", "checkpoint_version"} and
`latest_checkpointed_iteration.txt`), one tensor/pipeline/expert-parallel rank; merge
sharded checkpoints with Megatron's own tools first.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from moeflow.moe.errors import ConversionError  # re-exported: callers catch mck.ConversionError
from moeflow.moe.model import ModelConfig

LAYOUTS = ("sequential", "te_grouped", "grouped")


def _qkv_to_megatron(w: torch.Tensor, model_cfg: ModelConfig) -> torch.Tensor:
    """moeflow rows [q: H heads | k: G heads | v: G heads] -> megatron rows per query group g: [q of g's heads | k_g | v_g]."""
    H, G, hd, D = model_cfg.n_heads, model_cfg.kv_heads, model_cfg.head_size, w.shape[1]
    q, k, v = w.split([H * hd, G * hd, G * hd])
    return torch.cat([q.view(G, H // G * hd, D), k.view(G, hd, D), v.view(G, hd, D)], dim=1).reshape(-1, D)


def _qkv_from_megatron(w: torch.Tensor, model_cfg: ModelConfig) -> torch.Tensor:
    H, G, hd, D = model_cfg.n_heads, model_cfg.kv_heads, model_cfg.head_size, w.shape[1]
    q, k, v = w.view(G, (H // G + 2) * hd, D).split([H // G * hd, hd, hd], dim=1)
    return torch.cat([q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, D)])


def check_mappable(model_cfg: ModelConfig, state: dict | None = None) -> None:
    """Refuse model features this mapping does not carry, instead of dropping them silently."""
    unsupported = [
        name
        for name, on in (
            ("model.attn_bias", model_cfg.attn_bias),
            ("model.qk_norm", model_cfg.qk_norm),
            ("model.rope_scaling", model_cfg.rope_scaling),
            ("model.shared_expert_gate", model_cfg.shared_expert_gate),
            ("model.shared_d_ff", model_cfg.shared_d_ff is not None),
        )
        if on
    ]
    if state is not None and any(k.endswith(("experts.b1_EF", "experts.b2_ED", "experts.b3_EF")) for k in state):
        unsupported.append("expert biases (upcycled from a biased MLP)")
    if unsupported:
        raise ConversionError(
            f"{', '.join(unsupported)} have no megatron-core mapping in moeflow yet; convert a model without them"
        )


def _topk_gate_options(model_cfg: ModelConfig) -> dict:
    import inspect

    from moeflow.moe.gates.topk import TopKGate

    defaults = {
        n: p.default for n, p in inspect.signature(TopKGate.__init__).parameters.items() if p.default is not p.empty
    }
    return {**defaults, **{k: v for k, v in model_cfg.gate.items() if k != "name"}}


def router_config(model_cfg: ModelConfig) -> dict:
    """megatron-core TransformerConfig router fields that reproduce moeflow's `topk` gate.

    Routing (which experts, which weights) is the same in one process; the loss definitions
    (Switch, sequence-wise, z-loss) are the same formulas, but megatron counts tokens over
    the local micro-batch where moeflow counts the data-parallel batch (capacity and aux losses).
    Options megatron's router cannot reproduce raise ConversionError naming the option.
    """
    if model_cfg.gate.get("name") != "topk":
        raise ConversionError(
            f"gate={model_cfg.gate.get('name')!r} has no megatron-core equivalent (its router is top-k); export with the moeflow MoE layer inside megatron (native=False)"
        )
    g = _topk_gate_options(model_cfg)
    K, E = model_cfg.top_k, model_cfg.num_experts
    sigmoid = g["score_func"] == "sigmoid"
    # moeflow weights are the raw scores unless renormalised; megatron renormalises sigmoid
    # scores iff top_k > 1, and softmax ones unless moe_router_pre_softmax.
    raw_weights = not g["renormalize"] and not g["topk_before_softmax"]
    if g["noise_std"] > 0:
        raise ConversionError(
            "gate.noise_std (Gaussian logit noise) has no megatron-core router option; export with gate.noise_std=0"
        )
    if sigmoid and raw_weights != (K == 1):
        raise ConversionError(
            f"gate.renormalize={g['renormalize']} with gate.score_func=sigmoid and top_k={K}: megatron-core renormalises sigmoid weights exactly when top_k > 1; set gate.renormalize={K > 1}"
        )
    if not sigmoid and K == 1 and not raw_weights:
        raise ConversionError(
            "gate.renormalize=true (or topk_before_softmax) with top_k=1: megatron-core needs moe_router_pre_softmax for top-1, weighting by the softmax probability; set gate.renormalize=false"
        )
    if g["bias_update_rate"] > 0 and not sigmoid:
        raise ConversionError(
            "gate.bias_update_rate with gate.score_func=softmax: megatron-core's expert bias only works with sigmoid scores; use gate.score_func=sigmoid or gate.bias_update_rate=0"
        )
    out = {
        "moe_router_topk": K,
        "moe_router_score_function": g["score_func"],
        "moe_router_pre_softmax": not sigmoid and raw_weights,
    }
    if g["n_groups"] is not None:
        per_group = E // g["n_groups"]
        if K % g["topk_groups"] or K // g["topk_groups"] != min(2, per_group):
            raise ConversionError(
                f"gate.n_groups/topk_groups: moeflow ranks groups by their best {min(2, per_group)} scores, megatron-core by their best top_k/topk_groups={K // g['topk_groups']}; pick topk_groups = top_k / {min(2, per_group)}"
            )
        if not sigmoid and not g["topk_before_softmax"] and g["renormalize"]:
            raise ConversionError(
                "gate.n_groups with softmax scores and gate.renormalize=true: moeflow ranks groups on softmax scores, megatron-core on logits unless moe_router_pre_softmax (which does not renormalise); set gate.topk_before_softmax=true or gate.renormalize=false"
            )
        out.update(moe_router_num_groups=g["n_groups"], moe_router_group_topk=g["topk_groups"])
    if not g["dropless"]:
        if g["drop_policy"] != "score":
            raise ConversionError(
                "gate.drop_policy=position: megatron-core's position policy keeps an arbitrary capacity of each expert's tokens, not GShard's order; use gate.drop_policy=score"
            )
        if not raw_weights:
            raise ConversionError(
                "gate.capacity_factor with renormalised weights: megatron-core drops by renormalised weight, moeflow by router score; set gate.renormalize=false (and topk_before_softmax=false) or gate.dropless=true"
            )
        out.update(
            moe_expert_capacity_factor=float(g["capacity_factor"]),
            moe_token_drop_policy="probs",
            moe_pad_expert_input_to_capacity=False,
        )
    losses = [
        (t, float(g[k])) for t, k in (("aux_loss", "aux_loss_coef"), ("seq_aux_loss", "seq_aux_loss_coef")) if g[k] > 0
    ]
    types, coeffs = [t for t, _ in losses] or ["none"], [c for _, c in losses] or [0.0]
    out.update(
        moe_router_load_balancing_type=types[0] if len(types) == 1 else types,
        moe_aux_loss_coeff=coeffs[0] if len(coeffs) == 1 else coeffs,
    )
    if g["z_loss_coef"] > 0:
        out["moe_z_loss_coeff"] = float(g["z_loss_coef"])
    if g["jitter_eps"] > 0:
        out["moe_input_jitter_eps"] = float(g["jitter_eps"])
    if g["bias_update_rate"] > 0:
        out.update(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=float(g["bias_update_rate"]))
    return out


def _fc1(w1_FD: torch.Tensor, w3_FD: torch.Tensor | None) -> torch.Tensor:
    return torch.cat([w1_FD, w3_FD]) if w3_FD is not None else w1_FD


def _split_fc1(fc1: torch.Tensor, glu: bool):
    return tuple(fc1.chunk(2)) if glu else (fc1, None)


def to_megatron(
    state: dict[str, torch.Tensor], model_cfg: ModelConfig, layout: str = "sequential", native: bool = True
) -> dict[str, torch.Tensor]:
    """moeflow Transformer state_dict -> megatron-core GPTModel state_dict (tensors only)."""
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown experts layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if native:
        router_config(model_cfg)  # refuses gate options megatron-core's router cannot reproduce
    check_mappable(model_cfg, state)
    glu = model_cfg.activation == "swiglu"
    out = {
        "embedding.word_embeddings.weight": state["embed.weight"],
        "decoder.final_layernorm.weight": state["norm.weight"],
    }
    if not model_cfg.tie_embeddings:
        out["output_layer.weight"] = state["lm_head.weight"]
    for i in range(model_cfg.n_layers):
        s, m = f"blocks.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = state[s + "attn_norm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = _qkv_to_megatron(state[s + "attn.qkv.weight"], model_cfg)
        out[m + "self_attention.linear_proj.weight"] = state[s + "attn.out.weight"]
        out[m + "pre_mlp_layernorm.weight"] = state[s + "ffn_norm.weight"]
        if not model_cfg.is_moe_block(i):
            out[m + "mlp.linear_fc1.weight"] = _fc1(state[s + "ffn.w1.weight"], state.get(s + "ffn.w3.weight"))
            out[m + "mlp.linear_fc2.weight"] = state[s + "ffn.w2.weight"]
            continue
        if not native:
            for k, v in state.items():
                if k.startswith(s + "ffn."):
                    out[m + "mlp.moe." + k[len(s + "ffn.") :]] = v
            continue
        out[m + "mlp.router.weight"] = state[s + "ffn.gate.proj.weight"]
        if s + "ffn.gate.expert_bias_E" in state:  # aux-loss-free balancing (megatron keeps it in float32)
            out[m + "mlp.router.expert_bias"] = state[s + "ffn.gate.expert_bias_E"].float()
        w1, w2 = state[s + "ffn.experts.w1_EDF"], state[s + "ffn.experts.w2_EFD"]
        w3 = state.get(s + "ffn.experts.w3_EDF")
        E = w1.shape[0]
        if layout == "grouped":
            w13_EDF = torch.cat([w1, w3], dim=2) if glu else w1
            out[m + "mlp.experts.weight1"] = w13_EDF.contiguous().view(model_cfg.d_model, -1)
            out[m + "mlp.experts.weight2"] = w2.contiguous().view(-1, model_cfg.d_model)
        for e in range(E) if layout != "grouped" else ():
            fc1 = _fc1(w1[e].t(), w3[e].t() if glu else None).contiguous()
            fc2 = w2[e].t().contiguous()
            if layout == "sequential":
                out[m + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = fc1
                out[m + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = fc2
            else:
                out[m + f"mlp.experts.linear_fc1.weight{e}"] = fc1
                out[m + f"mlp.experts.linear_fc2.weight{e}"] = fc2
        if model_cfg.shared_experts:
            out[m + "mlp.shared_experts.linear_fc1.weight"] = _fc1(
                state[s + "ffn.shared_expert.w1.weight"], state.get(s + "ffn.shared_expert.w3.weight")
            )
            out[m + "mlp.shared_experts.linear_fc2.weight"] = state[s + "ffn.shared_expert.w2.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def detect_layout(state: dict) -> str | None:
    keys = " ".join(state)
    if ".mlp.moe." in keys:
        return "moeflow"
    if ".mlp.experts.local_experts." in keys:
        return "sequential"
    if re.search(r"\.mlp\.experts\.linear_fc1\.weight\d", keys):
        return "te_grouped"
    if ".mlp.experts.weight1" in keys:
        return "grouped"
    return None


def _get(state: dict, *names: str) -> torch.Tensor:
    for n in names:
        if n in state:
            return state[n]
    raise ConversionError(
        f"megatron checkpoint lacks {names[0]}; is it a GPT model with {names[0].split('.')[2] if names[0].count('.') > 2 else 'this'} layers?"
    )


def from_megatron(state: dict[str, torch.Tensor], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """megatron-core GPTModel state_dict (any of the three expert layouts, or moeflow-inside-megatron) -> moeflow."""
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    check_mappable(model_cfg)
    layout = detect_layout(state)
    glu = model_cfg.activation == "swiglu"
    F_, D = model_cfg.d_ff, model_cfg.d_model
    out = {
        "embed.weight": _get(state, "embedding.word_embeddings.weight"),
        "norm.weight": _get(state, "decoder.final_layernorm.weight"),
    }
    if not model_cfg.tie_embeddings:
        out["lm_head.weight"] = _get(state, "output_layer.weight")
    for i in range(model_cfg.n_layers):
        s, m = f"blocks.{i}.", f"decoder.layers.{i}."
        out[s + "attn_norm.weight"] = _get(
            state, m + "input_layernorm.weight", m + "self_attention.linear_qkv.layer_norm_weight"
        )
        out[s + "attn.qkv.weight"] = _qkv_from_megatron(_get(state, m + "self_attention.linear_qkv.weight"), model_cfg)
        out[s + "attn.out.weight"] = _get(state, m + "self_attention.linear_proj.weight")
        out[s + "ffn_norm.weight"] = _get(state, m + "pre_mlp_layernorm.weight", m + "mlp.linear_fc1.layer_norm_weight")
        if not model_cfg.is_moe_block(i):
            w1, w3 = _split_fc1(_get(state, m + "mlp.linear_fc1.weight"), glu)
            out[s + "ffn.w1.weight"], out[s + "ffn.w2.weight"] = w1, _get(state, m + "mlp.linear_fc2.weight")
            if glu:
                out[s + "ffn.w3.weight"] = w3
            continue
        if layout == "moeflow":
            for k, v in state.items():
                if k.startswith(m + "mlp.moe."):
                    out[s + "ffn." + k[len(m + "mlp.moe.") :]] = v
            continue
        out[s + "ffn.gate.proj.weight"] = _get(state, m + "mlp.router.weight")
        if m + "mlp.router.expert_bias" in state:  # the load accumulated since the last step is not saved by megatron
            out[s + "ffn.gate.expert_bias_E"] = state[m + "mlp.router.expert_bias"]
            out[s + "ffn.gate.load_accum_E"] = torch.zeros_like(state[m + "mlp.router.expert_bias"])
        E = model_cfg.num_experts
        if layout == "grouped":
            w13_EDF = _get(state, m + "mlp.experts.weight1").contiguous().view(E, D, -1)
            w1_EDF, w3_EDF = (w13_EDF[..., :F_], w13_EDF[..., F_:]) if glu else (w13_EDF, None)
            w2_EFD = _get(state, m + "mlp.experts.weight2").contiguous().view(E, F_, D)
        else:
            fmt = (
                (m + "mlp.experts.local_experts.{e}.linear_fc{n}.weight")
                if layout == "sequential"
                else (m + "mlp.experts.linear_fc{n}.weight{e}")
            )
            w1s, w3s, w2s = [], [], []
            for e in range(E):
                a, b = _split_fc1(_get(state, fmt.format(e=e, n=1)), glu)
                w1s.append(a.t())
                if glu:
                    w3s.append(b.t())
                w2s.append(_get(state, fmt.format(e=e, n=2)).t())
            w1_EDF, w3_EDF, w2_EFD = torch.stack(w1s), torch.stack(w3s) if glu else None, torch.stack(w2s)
        out[s + "ffn.experts.w1_EDF"], out[s + "ffn.experts.w2_EFD"] = w1_EDF.contiguous(), w2_EFD.contiguous()
        if glu:
            out[s + "ffn.experts.w3_EDF"] = w3_EDF.contiguous()
        if model_cfg.shared_experts:
            w1, w3 = _split_fc1(_get(state, m + "mlp.shared_experts.linear_fc1.weight"), glu)
            out[s + "ffn.shared_expert.w1.weight"], out[s + "ffn.shared_expert.w2.weight"] = (
                w1,
                _get(state, m + "mlp.shared_experts.linear_fc2.weight"),
            )
            if glu:
                out[s + "ffn.shared_expert.w3.weight"] = w3
    return {k: v.contiguous() for k, v in out.items()}


def infer_model_config(state: dict, n_heads: int, top_k: int, **overrides) -> ModelConfig:
    """The moeflow ModelConfig of a megatron GPT state_dict; heads and top-k are not in the weights."""
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    vocab, D = state["embedding.word_embeddings.weight"].shape
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("decoder.layers.")})
    moe = [
        i
        for i in layers
        if any(k.startswith(f"decoder.layers.{i}.mlp.") and (".experts." in k or ".moe." in k) for k in state)
    ]
    if not moe:
        raise ConversionError("the megatron checkpoint has no MoE layers; moeflow converts MoE GPT models")
    every = moe[0] + 1
    if moe != [i for i in layers if (i + 1) % every == 0]:
        raise ConversionError(
            f"MoE layers {moe} are not every {every}-th layer; moeflow's model.moe_every cannot express this layout"
        )
    m = f"decoder.layers.{moe[0]}.mlp."
    layout = detect_layout(state)
    if layout == "moeflow":
        raise ConversionError(
            "this checkpoint holds moeflow MoE layers inside megatron: read its model config from the moeflow run that wrote it"
        )
    E = state[m + "router.weight"].shape[0]
    if layout == "grouped":
        F2 = state[m + "experts.weight2"].shape[0] // E
        glu = state[m + "experts.weight1"].shape[1] // E == 2 * F2
        F_ = F2
    else:
        fc1 = (
            state[m + "experts.local_experts.0.linear_fc1.weight"]
            if layout == "sequential"
            else state[m + "experts.linear_fc1.weight0"]
        )
        fc2 = (
            state[m + "experts.local_experts.0.linear_fc2.weight"]
            if layout == "sequential"
            else state[m + "experts.linear_fc2.weight0"]
        )
        F_, glu = fc2.shape[1], fc1.shape[0] == 2 * fc2.shape[1]
    dense = [i for i in layers if i not in moe]
    dense_d_ff = state[f"decoder.layers.{dense[0]}.mlp.linear_fc2.weight"].shape[1] if dense else None
    shared = m + "shared_experts.linear_fc2.weight"
    qkv_rows, proj_cols = (
        state["decoder.layers.0.self_attention.linear_qkv.weight"].shape[0],
        state["decoder.layers.0.self_attention.linear_proj.weight"].shape[1],
    )
    hd = proj_cols // n_heads
    kv = (qkv_rows // hd - n_heads) // 2
    fields = dict(
        vocab_size=vocab,
        d_model=D,
        n_layers=len(layers),
        n_heads=n_heads,
        d_ff=F_,
        num_experts=E,
        top_k=top_k,
        n_kv_heads=kv if kv != n_heads else None,
        head_dim=hd if hd * n_heads != D else None,
        moe_every=every,
        activation="swiglu" if glu else "gelu",
        tie_embeddings="output_layer.weight" not in state,
        dense_d_ff=dense_d_ff,
        gate={"name": "topk"},
    )
    if shared in state:
        shared_ff = state[shared].shape[1]
        unit = dense_d_ff or F_ * top_k
        if shared_ff % unit:
            raise ConversionError(
                f"shared expert hidden size {shared_ff} is not a multiple of {unit}; set dense_d_ff to express it"
            )
        fields["shared_experts"] = shared_ff // unit
    fields.update(overrides)
    return ModelConfig(**fields)


# ---- files -------------------------------------------------------------------------------


def megatron_checkpoint_file(path: str | Path) -> Path:
    """A model_optim_rng.pt, an iter_N dir, or a checkpoint root with latest_checkpointed_iteration.txt."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / "latest_checkpointed_iteration.txt").exists():
        it = (p / "latest_checkpointed_iteration.txt").read_text().strip()
        p = p / (f"iter_{int(it):07d}" if it.isdigit() else it)
    files = sorted(p.glob("mp_rank_*/model_optim_rng.pt"))
    if len(files) != 1:
        raise ConversionError(
            f"{path}: expected one mp_rank_*/model_optim_rng.pt (a torch-format checkpoint of one model-parallel rank), found {len(files)}; merge sharded checkpoints with Megatron's tools first"
        )
    return files[0]


PICKLE_WARNING = (
    "megatron-core's torch-format checkpoints are pickles, and unpickling can run any code the file holds; "
    "pass --trust-checkpoint only for a file you (or someone you trust) wrote"
)


def load_megatron(path: str | Path, trust: bool = False) -> tuple[dict, dict]:
    """The model state of a megatron-core torch checkpoint: tensors and plain values only (weights_only)
    unless `trust` (its argparse Namespace, RNG states... need full unpickling)."""
    f = megatron_checkpoint_file(path)
    try:
        ck = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust:
            raise ConversionError(
                f"{f} needs full unpickling ({str(e).splitlines()[0][:160]}); {PICKLE_WARNING}"
            ) from None
        ck = torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConversionError(f"{f} is not a readable torch checkpoint ({e})") from None
    state = ck.get("model", ck) if isinstance(ck, dict) else None
    if not isinstance(state, dict):
        raise ConversionError(f"{f} holds no model state_dict")
    return state, ck


def save_megatron(state: dict, out_dir: str | Path, iteration: int, extra: dict | None = None) -> Path:
    out = Path(out_dir) / f"iter_{iteration:07d}" / "mp_rank_00"
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model": state, "iteration": iteration, "checkpoint_version": 3.0, **(extra or {})}, out / "model_optim_rng.pt"
    )
    (Path(out_dir) / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return out / "model_optim_rng.pt"
