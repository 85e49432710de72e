"""`moeflow upcycle SOURCE OUTPUT [options]`: turn a dense checkpoint into an MoE.

SOURCE is a moeflow checkpoint (or run dir) of a dense model, or a local Hugging Face
folder (config.json + safetensors). OUTPUT receives, by --format:
  moeflow  a moeflow checkpoint to continue with `moeflow train` (weights-only: fresh
           optimizer at step 0) plus generated Hydra configs `model=upcycled gate=upcycled`;
  hf       a Mixtral / Qwen2-MoE / Qwen3-MoE folder that transformers loads;
  both     OUTPUT/moeflow and OUTPUT/hf;
  generic  (GPT-2, or any model with --generic) the transformers model with moeflow MoE
           layers: config.json + upcycle.json + model.safetensors, reloaded with
           `moeflow.moe.hf_convert.load_upcycled(OUTPUT)`.
Everything is written under a temporary name and renamed into place once verified.
"""

from __future__ import annotations

import argparse
import json

import torch

from moeflow.moe.upcycle import UpcycleError, UpcycleOptions

from .run import DTYPES, run


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="moeflow upcycle",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("source", help="dense moeflow checkpoint / run dir, or Hugging Face model folder")
    p.add_argument("output", help="folder to create (must not exist unless --force)")
    p.add_argument(
        "--format",
        choices=("auto", "moeflow", "hf", "both", "generic"),
        default="auto",
        help="auto: both for Llama-family HF folders, moeflow for moeflow checkpoints, generic for GPT-2",
    )
    p.add_argument("--num-experts", type=int, default=8, help="copies of the dense MLP (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2; times --granularity)")
    p.add_argument("--gate", default="topk", help="gate from the registry (topk, dts, ...); HF export needs topk")
    p.add_argument(
        "--gate-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="gate constructor option (JSON value), repeatable",
    )
    p.add_argument(
        "--router-init",
        choices=("auto", "zero", "normal"),
        default="auto",
        help="auto (default): small-normal, tied across slices with --granularity > 1, so the copies diverge; zero: uniform routing, identical experts stay identical",
    )
    p.add_argument("--router-std", type=float, default=0.02)
    p.add_argument(
        "--expert-noise",
        type=float,
        default=0.0,
        help="relative noise added to each expert copy (default off; breaks exactness)",
    )
    p.add_argument(
        "--granularity", type=int, default=1, help="split each MLP into m experts of width F/m (top-k scaled by m)"
    )
    p.add_argument("--shared-expert", action="store_true", help="keep the dense MLP as an always-on shared expert")
    p.add_argument(
        "--shared-fraction", type=float, default=0.5, help="share of the output the shared expert keeps (default 0.5)"
    )
    p.add_argument("--moe-every", type=int, default=1, help="upcycle every n-th MLP (default 1: all)")
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="precision to upcycle, verify and save the moeflow checkpoint in (default float32; bfloat16 halves memory for large models); HF exports keep the source's dtype",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="moeflow model.max_seq_len (default: min(max_position_embeddings, sliding window, 4096))",
    )
    p.add_argument(
        "--generic",
        action="store_true",
        help="use the generic module-tree path (any architecture transformers can load)",
    )
    p.add_argument("--selector", default=None, help="generic path: regex on module names selecting the MLPs")
    p.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip running dense vs upcycled on random tokens"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    return p.parse_args(argv)


def gate_options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UpcycleError(f"--gate-option {pair!r} is not KEY=VALUE; e.g. --gate-option aux_loss_coef=0.02")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def options_from(args: argparse.Namespace) -> UpcycleOptions:
    return UpcycleOptions(
        num_experts=args.num_experts,
        top_k=args.top_k,
        gate=args.gate,
        gate_options=gate_options(args.gate_option),
        router_init=args.router_init,
        router_std=args.router_std,
        expert_noise=args.expert_noise,
        granularity=args.granularity,
        shared_expert=args.shared_expert,
        shared_fraction=args.shared_fraction,
        moe_every=args.moe_every,
        seed=args.seed,
    )


def upcycle(argv: list[str]) -> dict:
    """Parse `moeflow upcycle` arguments and run; the report (what was written and verified)."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    return run(args, options_from(args))


def main(argv: list[str]) -> None:
    upcycle(argv)  # bad input raises MoeflowError: the CLI prints it in one line
