"""`moeflow convert`: move checkpoints between moeflow, Hugging Face, DeepSpeed and megatron-core.

  moeflow convert hf-to-moeflow          HF_MOE_FOLDER OUT_DIR   (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; --no-verify)
  moeflow convert moeflow-to-hf          RUN_OR_CKPT OUT_DIR [--arch auto|mixtral|qwen2_moe|qwen3_moe|olmoe] [--dtype bfloat16]
  moeflow convert deepspeed-to-moeflow RUN_OR_DS_CKPT OUT_RUN_DIR
  moeflow convert moeflow-to-megatron  RUN_OR_CKPT OUT_DIR [--layout sequential|te_grouped|grouped]
  moeflow convert megatron-to-moeflow  MEGATRON_CKPT OUT_RUN_DIR --n-heads N --top-k K
  moeflow convert moeflow-to-safetensors RUN_OR_CKPT OUT_RUN_DIR [--shard-gib 5]

Outputs: moeflow checkpoints land in OUT_RUN_DIR/checkpoints/step_N/ (resume with
`moeflow train resume=...`); megatron checkpoints in megatron's torch format
(OUT_DIR/iter_N/mp_rank_00/model_optim_rng.pt + latest_checkpointed_iteration.txt).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moeflow.moe.errors import CheckpointError


def deepspeed_to_moeflow(args) -> Path:
    from moeflow.launch.engines import require
    from moeflow.launch.engines.deepspeed_engine import convert_to_moeflow

    require("deepspeed")
    return convert_to_moeflow(args.src, args.out, trust=args.trust_checkpoint)


def moeflow_to_megatron(args) -> Path:
    from moeflow.launch import checkpoint as ckpt
    from moeflow.moe.model import ModelConfig
    from moeflow.parallel.integrations import megatron_ckpt as mck

    found = ckpt.find_checkpoint(args.src)
    if found is None:
        raise ckpt.CheckpointError(
            f"{args.src}: no moeflow checkpoint there; pass a run dir or a checkpoints/step_* dir"
        )
    meta = ckpt.read_meta(found)
    model_cfg = ModelConfig(**meta["model"])
    state = mck.to_megatron(ckpt.load_full_weights(found, trust=args.trust_checkpoint), model_cfg, layout=args.layout)
    extra = {
        "moeflow_model": model_cfg.to_dict(),
        "megatron_router_config": mck.router_config(model_cfg),
    }  # the TransformerConfig router fields to train it with
    return mck.save_megatron(state, args.out, int(meta["step"]), extra)


def megatron_to_moeflow(args) -> Path:
    from moeflow.launch import checkpoint as ckpt
    from moeflow.parallel.integrations import megatron_ckpt as mck

    state, whole = mck.load_megatron(args.src, trust=args.trust_checkpoint)
    if "moeflow_model" in whole:  # written by moeflow-to-megatron: the exact config travels along
        from moeflow.moe.model import ModelConfig

        model_cfg = ModelConfig(**whole["moeflow_model"])
    else:
        if args.n_heads is None or args.top_k is None:
            raise mck.ConversionError("pass --n-heads and --top-k: a megatron checkpoint's weights do not record them")
        model_cfg = mck.infer_model_config(state, n_heads=args.n_heads, top_k=args.top_k)
    weights = mck.from_megatron(state, model_cfg)
    step = int(whole.get("iteration", 0))
    meta = {
        "model": model_cfg.to_dict(),
        "config": {},
        "converted_from": {"format": "megatron-core", "path": str(args.src)},
    }
    return ckpt.save_checkpoint(Path(args.out), step, weights, {"step": step}, meta, keep=0)


def refuse_writing_into_source(found: Path, out) -> None:
    """A conversion never writes into the run it reads (it would replace the checkpoint it converts)."""
    out_root = (Path(out).expanduser() / "checkpoints").resolve()
    if found.resolve().parent == out_root or Path(out).expanduser().resolve() == found.resolve():
        raise CheckpointError(f"{out} is the run being converted ({found}); write the conversion into another dir")


def moeflow_to_safetensors(args) -> Path:
    """A sharded (DCP) checkpoint -> a consolidated one: weights in safetensors files of at most
    --shard-gib each (with an index when there are several), streamed tensor batch by tensor batch
    on this machine's CPU, so no process ever holds more than a batch; the step and schedule come
    along (optimizer moments do not: the result resumes with fresh ones)."""
    from moeflow.launch import checkpoint as ckpt
    from moeflow.parallel.checkpoint import iter_full_tensors

    found = ckpt.find_checkpoint(args.src)
    if found is None:
        raise ckpt.CheckpointError(
            f"{args.src}: no moeflow checkpoint there; pass a run dir or a checkpoints/step_* dir"
        )
    if not ckpt.is_sharded(found):
        raise ckpt.CheckpointError(f"{found} is consolidated already (safetensors); nothing to convert")
    meta, trainer_state = ckpt.read_meta(found), ckpt.load_trainer_state(found)
    step = int(meta.get("step", (trainer_state or {}).get("step", 0)))
    out_state = {
        k: v for k, v in (trainer_state or {}).items() if k in ("step", "scheduler", "engine", "global_batch")
    } or None
    meta = {**meta, "format": "safetensors", "converted_from": {"format": "dcp", "path": str(found)}}
    limit = int(args.shard_gib * 2**30)
    return ckpt.save_streamed(
        args.out,
        step,
        iter_full_tensors(found, "model.", max_bytes=limit, trust=args.trust_checkpoint),
        meta,
        limit,
        trainer_state=out_state,
    )


def hf_to_moeflow(args) -> Path:
    from moeflow.launch.hf_models import hf_to_moeflow as run

    return run(args)


def moeflow_to_hf(args) -> Path:
    from moeflow.launch.hf_models import moeflow_to_hf as run

    return run(args)


ACTIONS = {
    "hf-to-moeflow": hf_to_moeflow,
    "moeflow-to-hf": moeflow_to_hf,
    "deepspeed-to-moeflow": deepspeed_to_moeflow,
    "moeflow-to-megatron": moeflow_to_megatron,
    "megatron-to-moeflow": megatron_to_moeflow,
    "moeflow-to-safetensors": moeflow_to_safetensors,
}


def main(argv: list[str]) -> None:
    from moeflow.parallel.integrations.megatron_ckpt import LAYOUTS

    ap = argparse.ArgumentParser(
        prog="moeflow convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("action", choices=sorted(ACTIONS))
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument(
        "--layout", choices=LAYOUTS, default="sequential", help="megatron expert layout to write (moeflow-to-megatron)"
    )
    ap.add_argument("--n-heads", type=int, help="attention heads (megatron-to-moeflow, not in the weights)")
    ap.add_argument("--top-k", type=int, help="experts per token (megatron-to-moeflow, not in the weights)")
    ap.add_argument(
        "--shard-gib",
        type=float,
        default=5.0,
        help="largest safetensors file (moeflow-to-safetensors, moeflow-to-hf, hf-to-moeflow)",
    )
    ap.add_argument(
        "--arch",
        choices=("auto", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"),
        default="auto",
        help="moeflow-to-hf: target architecture (auto: the one the model's layers match)",
    )
    ap.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="moeflow-to-hf: dtype of the written weights",
    )
    ap.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="hf-to-moeflow: model.max_seq_len (default: min(max_position_embeddings, sliding window, 4096))",
    )
    ap.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="hf-to-moeflow / moeflow-to-hf: skip the logit comparison with transformers' model",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the verification tokens")
    ap.add_argument(
        "--verify-full-gib",
        type=float,
        default=8.0,
        help="hf-to-moeflow: verify the whole model up to this float32 size, else its first two layers",
    )
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists (otherwise refused)")
    ap.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="DeepSpeed and megatron torch-format checkpoints, and moeflow's own before its safetensors format, are pickles, which can run "
        "code when loaded: load them only with this flag",
    )
    args = ap.parse_args(argv)
    if args.action in ("hf-to-moeflow", "moeflow-to-hf"):  # these two write through their own temp folder
        out = ACTIONS[args.action](args)  # bad input raises MoeflowError: the CLI prints it in one line
    else:
        out = write_whole(args)
    print(f"wrote {out}")


def write_whole(args) -> Path:
    """Every conversion alike: OUT that exists is refused without --force, and the result is written
    into a temp folder beside it and moved into place once whole (a failure leaves OUT as it was)."""
    import shutil

    from .upcycle.outputs import atomic_output

    out = Path(args.out).expanduser()
    if args.action != "megatron-to-moeflow":
        from . import checkpoint as ckpt

        found = ckpt.find_checkpoint(args.src)
        if found is not None:
            refuse_writing_into_source(found, out)  # even with --force
    if out.exists() and not args.force:
        raise CheckpointError(f"{out} already exists; choose a new output folder or pass --force to replace it")
    tmp, commit = atomic_output(out, args.force)
    try:
        ACTIONS[args.action](argparse.Namespace(**{**vars(args), "out": str(tmp)}))
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
