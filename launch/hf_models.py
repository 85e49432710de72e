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
from moeflow.moe.upcycle import max_logit_diff

from . import checkpoint as ckpt
from .upcycle.outputs import atomic_output, gate_node, train_command, write_model_dir

VERIFY_RTOL = 1e-5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMPORTED = "imported"  # the config names `moeflow train model=imported gate=imported`
TOKENIZER_DIR = "tokenizer"  # the source's tokenizer files, kept for generate / eval / data prepare


def verify(name: str, reference, model, vocab: int, seq: int, seed: int) -> dict:
    """Logits of both on the same random tokens; raises unless they agree to VERIFY_RTOL."""
    diff = max_logit_diff(reference, model, vocab, seq_len=seq, seed=seed)
    print(f"verify {name}: max |logit diff| {diff['max_abs_diff']:.3e} (relative {diff['max_rel_diff']:.3e}, limit {VERIFY_RTOL:g}) on {diff['tokens'][0]}x{diff['tokens'][1]} random tokens")
    if not diff["max_rel_diff"] <= VERIFY_RTOL:
        raise hf.ConversionError(f"verification failed for {name}: relative logit difference {diff['max_rel_diff']:.3e} > {VERIFY_RTOL:g}; nothing was written (please report this model)")
    return diff


@torch.no_grad()
def round_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Parameters rounded to `dtype` and kept in float32 (buffers such as rotary tables stay exact)."""
    for p in model.parameters():
        p.copy_(p.to(dtype).float())
    return model


def hf_to_moeflow(args) -> Path:
    """A Hugging Face MoE folder -> a weights-only moeflow checkpoint with `model=imported gate=imported`."""
    src, out = Path(args.src).expanduser(), Path(args.out).expanduser()
    model, source = hf_moe.load_moe(src, args.max_seq_len)
    model.cfg.gate = gate_node("topk", {k: v for k, v in model.cfg.gate.items() if k != "name"})
    report = {"source": str(src), "model_type": source.model_type, "verify": None}
    tmp, commit = atomic_output(out, args.force)
    try:
        if args.verify:
            theirs = hf.load_hf_model(src)
            report["verify"] = verify(f"moeflow vs transformers {source.model_type}", lambda t: theirs(t).logits, model, model.cfg.vocab_size, min(32, model.cfg.max_seq_len), args.seed)
            del theirs
        meta = {"imported_from": str(src), "hf_config": source.config}
        write_model_dir(tmp, model, meta, IMPORTED, "moeflow convert hf-to-moeflow")
        copy_tokenizer(src, tmp / TOKENIZER_DIR)
        report["train_command"] = train_command(out, IMPORTED)
        (tmp / "convert.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"{source.model_type}: {model.num_params() / 1e6:.2f}M parameters ({model.num_params(active_only=True) / 1e6:.2f}M active), {model.cfg.num_experts} experts, top-{model.cfg.top_k}")
    print(f"continue training with (add your data=... and trainer.* overrides):\n  {report['train_command']}")
    return out


def copy_tokenizer(src: Path, dst: Path) -> None:
    names = [n for n in hf._COPY_FILES if (src / n).is_file()]
    if names:
        dst.mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copy2(src / n, dst / n)


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
    model = hf_moe.build_from_state(model_cfg, ckpt.load_full_weights(found))
    if dtype != torch.float32:  # the reference computes with the weights the export holds
        round_parameters(model, dtype)
    source_cfg = meta.get("hf_config") or {}
    config = {**hf_moe.export_config(model_cfg, target, source_cfg), "torch_dtype": args.dtype}
    out = Path(args.out).expanduser()
    tmp, commit = atomic_output(out, args.force)
    try:
        tokenizer = tokenizer_dir(found)
        hf.save_hf(tmp, config, hf_moe.export_tensors(model, target, dtype), tokenizer, shard_gib=args.shard_gib)
        if args.verify:
            theirs = hf.load_hf_model(tmp)  # float32
            verify(f"transformers {target} vs moeflow", lambda t: theirs(t).logits, model, model_cfg.vocab_size, min(32, model_cfg.max_seq_len), args.seed)
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return out


def tokenizer_dir(found: Path) -> Path | None:
    """The tokenizer files that came with the model (an import's tokenizer/ folder), if any."""
    for d in (found.parent.parent / TOKENIZER_DIR, found.parent / TOKENIZER_DIR, found / TOKENIZER_DIR):
        if d.is_dir():
            return d
    return None
