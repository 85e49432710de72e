"""`moeflow convert hf-to-moeflow` / `moeflow-to-hf`: Hugging Face MoE models in and out, verified.

Both directions run transformers' own model and the moeflow model on the same random tokens
and write nothing unless the float32 logits agree to `VERIFY_RTOL` (relative to the largest
logit). An export that cannot be exact is refused before any weights are read, naming the
option (`moeflow.moe.hf_moe.export_blockers`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from moeflow.moe import hf_convert as hf
from moeflow.moe import hf_moe
from moeflow.moe.config import ModelConfig
from moeflow.moe.param_count import param_counts
from moeflow.moe.upcycle import max_logit_diff

from . import checkpoint as ckpt
from .tokenizer_files import TOKENIZER_DIR, checkpoint_tokenizer, copy_tokenizer, make_auto_loadable
from .upcycle.outputs import atomic_output, gate_node, train_command, write_configs

VERIFY_RTOL = 1e-5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMPORTED = "imported"  # the config names `moeflow train model=imported gate=imported`


def verify(name: str, reference, model, vocab: int, seq: int, seed: int) -> dict:
    """Logits of both on the same random tokens; raises unless they agree to VERIFY_RTOL."""
    diff = max_logit_diff(reference, model, vocab, seq_len=seq, seed=seed)
    print(
        f"verify {name}: max |logit diff| {diff['max_abs_diff']:.3e} (relative {diff['max_rel_diff']:.3e}, limit {VERIFY_RTOL:g}) on {diff['tokens'][0]}x{diff['tokens'][1]} random tokens"
    )
    if not diff["max_rel_diff"] <= VERIFY_RTOL:
        raise hf.ConversionError(
            f"verification failed for {name}: relative logit difference {diff['max_rel_diff']:.3e} > {VERIFY_RTOL:g}; nothing was written (please report this model)"
        )
    return diff


@torch.no_grad()
def round_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Parameters rounded to `dtype` and kept in float32 (buffers such as rotary tables stay exact)."""
    for p in model.parameters():
        p.copy_(p.to(dtype).float())
    return model


def hf_to_moeflow(args) -> Path:
    """A Hugging Face MoE folder -> a weights-only moeflow checkpoint with `model=imported gate=imported`,
    streamed layer by layer (one process never holds the whole model)."""
    from tqdm import tqdm

    src, out = Path(args.src).expanduser(), Path(args.out).expanduser()
    cfg, tensors = hf_moe.open_moe(src)  # config.json checked before any weights are read
    model_type = cfg["model_type"]
    model_cfg = hf_moe.moe_config_from_hf(cfg, tensors, args.max_seq_len)
    model_cfg.gate = gate_node("topk", {k: v for k, v in model_cfg.gate.items() if k != "name"})
    report = {"source": str(src), "model_type": model_type, "verify": None}
    tmp, commit = atomic_output(out, args.force)
    try:
        if args.verify:
            report["verify"] = verify_import(src, cfg, tensors, model_cfg, tmp / ".verify", args)
        full = write_configs(tmp, model_cfg, IMPORTED, "moeflow convert hf-to-moeflow")
        meta = {
            "model": model_cfg.to_dict(),
            "config": full,
            "weights_only": True,
            "imported_from": str(src),
            "hf_config": cfg,
        }
        bar = tqdm(total=model_cfg.n_layers, desc="import", unit=" layers", disable=not getattr(args, "progress", True))
        layer_done = lambda name: bar.update(1) if name.endswith("ffn_norm.weight") else None  # noqa: E731
        ckpt.save_streamed(
            tmp,
            0,
            hf_moe.iter_moeflow_tensors(model_cfg, tensors, model_type),
            meta,
            int(args.shard_gib * 2**30),
            layer_done,
        )
        bar.close()
        copy_tokenizer(src, tmp / TOKENIZER_DIR)
        report["train_command"] = train_command(out)
        (tmp / "convert.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total, active = param_counts(model_cfg)
    print(
        f"{model_type}: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active), {model_cfg.num_experts} experts, top-{model_cfg.top_k}"
    )
    print(f"continue training with (add your data=... and trainer.* overrides):\n  {report['train_command']}")
    return out


def verify_import(src: Path, cfg: dict, tensors, model_cfg: ModelConfig, scratch: Path, args) -> dict:
    """transformers' model against moeflow's on random tokens: the whole model when it is at most
    --verify-full-gib (float32), else its first two layers (the mapping is the same for every layer)."""
    import dataclasses

    from safetensors.torch import save_file

    layers = model_cfg.n_layers
    if tensors.nbytes() > args.verify_full_gib * 2**30:
        layers = min(layers, 2)
    if layers == model_cfg.n_layers:
        theirs = hf.load_hf_model(src)
        mine = hf_moe.build_from_state(model_cfg, hf_moe.hf_moe_to_moeflow_state(model_cfg, tensors, cfg["model_type"]))
        what = "moeflow vs transformers"
    else:  # a truncated copy of both: the same embedding, head and first layers
        part_cfg = dataclasses.replace(model_cfg, n_layers=layers)
        scratch.mkdir(parents=True)
        keep = [k for k in tensors if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers]
        save_file({k: tensors[k] for k in keep}, str(scratch / hf.SINGLE_FILE), metadata={"format": "pt"})
        small = {**cfg, "num_hidden_layers": layers}
        if isinstance(cfg.get("layer_types"), list):
            small["layer_types"] = cfg["layer_types"][:layers]
        (scratch / "config.json").write_text(json.dumps(small))
        theirs = hf.load_hf_model(scratch)
        mine = hf_moe.build_from_state(
            part_cfg, dict(hf_moe.iter_moeflow_tensors(part_cfg, tensors, cfg["model_type"], check_unused=False))
        )
        what = f"moeflow vs transformers (first {layers} of {model_cfg.n_layers} layers; --verify-full-gib)"
    diff = verify(
        f"{what} {cfg['model_type']}",
        lambda t: theirs(t).logits,
        mine,
        model_cfg.vocab_size,
        min(32, model_cfg.max_seq_len),
        args.seed,
    )
    shutil.rmtree(scratch, ignore_errors=True)
    return {**diff, "layers_checked": layers}


def load_moeflow(src: str | Path) -> tuple[ModelConfig, dict, Path]:
    found = ckpt.find_checkpoint(src)
    if found is None:
        raise ckpt.CheckpointError(f"{src}: no moeflow checkpoint there; pass a run dir or a checkpoints/step_* dir")
    meta = ckpt.read_meta(found)
    return ModelConfig(**meta["model"]), meta, found


def moeflow_to_hf(args) -> Path:
    """A moeflow run or checkpoint -> a Hugging Face folder of the architecture that computes it exactly."""
    model_cfg, meta, found = load_moeflow(args.src)
    target = hf_moe.auto_target(model_cfg) if args.arch == "auto" else args.arch
    hf_moe.check_exportable(model_cfg, target)  # before reading any weights
    dtype = DTYPES[args.dtype]
    model = hf_moe.build_from_state(
        model_cfg, ckpt.load_full_weights(found, trust=getattr(args, "trust_checkpoint", False))
    )
    if dtype != torch.float32:  # the reference computes with the weights the export holds
        round_parameters(model, dtype)
    source_cfg = meta.get("hf_config") or {}
    config = {**hf_moe.export_config(model_cfg, target, source_cfg), "torch_dtype": args.dtype}
    out = Path(args.out).expanduser()
    tmp, commit = atomic_output(out, args.force)
    try:
        carry_tokenizer(found, tmp, config)  # before save_hf, which writes config.json with the ids it adds
        hf.save_hf(tmp, config, hf_moe.export_tensors(model, target, dtype), shard_gib=args.shard_gib)
        if args.verify:
            theirs = hf.load_hf_model(tmp)  # float32
            verify(
                f"transformers {target} vs moeflow",
                lambda t: theirs(t).logits,
                model,
                model_cfg.vocab_size,
                min(32, model_cfg.max_seq_len),
                args.seed,
            )
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})"
        + (
            f" and AutoTokenizer.from_pretrained({str(out)!r})"
            if (out / "tokenizer_config.json").is_file()
            else " (the run records no tokenizer: byte-level, or pass one to transformers yourself)"
        )
    )
    return out


def carry_tokenizer(found: Path, folder: Path, config: dict) -> None:
    """The run's tokenizer into an export, loadable by AutoTokenizer, and its special-token ids into
    `config` where the source config had none (transformers' generate stops at eos_token_id)."""
    src = checkpoint_tokenizer(found)
    if src is None or not copy_tokenizer(src, folder):
        return
    ids = make_auto_loadable(folder)
    for key, value in ids.items():
        if config.get(key) is None and value < config["vocab_size"]:
            config[key] = value
