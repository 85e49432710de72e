"""`moeflow convert`: move checkpoints between moeflow, DeepSpeed and megatron-core.

  moeflow convert deepspeed-to-moeflow RUN_OR_DS_CKPT OUT_RUN_DIR
  moeflow convert moeflow-to-megatron  RUN_OR_CKPT OUT_DIR [--layout sequential|te_grouped|grouped]
  moeflow convert megatron-to-moeflow  MEGATRON_CKPT OUT_RUN_DIR --n-heads N --top-k K

Outputs: moeflow checkpoints land in OUT_RUN_DIR/checkpoints/step_N/ (resume with
`moeflow train resume=...`); megatron checkpoints in megatron's torch format
(OUT_DIR/iter_N/mp_rank_00/model_optim_rng.pt + latest_checkpointed_iteration.txt).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def deepspeed_to_moeflow(args) -> Path:
    from moeflow.launch.engines import require
    from moeflow.launch.engines.deepspeed_engine import convert_to_moeflow

    require("deepspeed")
    return convert_to_moeflow(args.src, args.out)


def moeflow_to_megatron(args) -> Path:
    from moeflow.launch import checkpoint as ckpt
    from moeflow.moe.model import ModelConfig
    from moeflow.parallel.integrations import megatron_ckpt as mck

    found = ckpt.find_checkpoint(args.src)
    if found is None:
        raise ckpt.CheckpointError(f"{args.src}: no moeflow checkpoint there; pass a run dir or a checkpoints/step_* dir")
    meta = ckpt.read_meta(found)
    model_cfg = ModelConfig(**meta["model"])
    state = mck.to_megatron(ckpt.load_model_state(found), model_cfg, layout=args.layout)
    extra = {"moeflow_model": model_cfg.to_dict(), "megatron_router_config": mck.router_config(model_cfg)}  # the TransformerConfig router fields to train it with
    return mck.save_megatron(state, args.out, int(meta["step"]), extra)


def megatron_to_moeflow(args) -> Path:
    from moeflow.launch import checkpoint as ckpt
    from moeflow.parallel.integrations import megatron_ckpt as mck

    state, whole = mck.load_megatron(args.src)
    if "moeflow_model" in whole:  # written by moeflow-to-megatron: the exact config travels along
        from moeflow.moe.model import ModelConfig

        model_cfg = ModelConfig(**whole["moeflow_model"])
    else:
        if args.n_heads is None or args.top_k is None:
            raise mck.ConversionError("pass --n-heads and --top-k: a megatron checkpoint's weights do not record them")
        model_cfg = mck.infer_model_config(state, n_heads=args.n_heads, top_k=args.top_k)
    weights = mck.from_megatron(state, model_cfg)
    step = int(whole.get("iteration", 0))
    meta = {"model": model_cfg.to_dict(), "config": {}, "converted_from": {"format": "megatron-core", "path": str(args.src)}}
    return ckpt.save_checkpoint(Path(args.out), step, weights, {"step": step}, meta, keep=0)


ACTIONS = {"deepspeed-to-moeflow": deepspeed_to_moeflow, "moeflow-to-megatron": moeflow_to_megatron, "megatron-to-moeflow": megatron_to_moeflow}


def main(argv: list[str]) -> None:
    from moeflow.parallel.integrations.megatron_ckpt import LAYOUTS

    ap = argparse.ArgumentParser(prog="moeflow convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=sorted(ACTIONS))
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--layout", choices=LAYOUTS, default="sequential", help="megatron expert layout to write (moeflow-to-megatron)")
    ap.add_argument("--n-heads", type=int, help="attention heads (megatron-to-moeflow, not in the weights)")
    ap.add_argument("--top-k", type=int, help="experts per token (megatron-to-moeflow, not in the weights)")
    args = ap.parse_args(argv)
    out = ACTIONS[args.action](args)  # bad input raises MoeflowError: the CLI prints it in one line
    print(f"wrote {out}")
