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
import os
import shutil
import sys
from pathlib import Path

import torch

from moeflow.moe import hf_convert as hf
from moeflow.moe.model import Transformer
from moeflow.moe.upcycle import UpcycleError, UpcycleOptions, max_logit_diff, upcycle_model, upcycle_transformer

from . import checkpoint as ckpt
from .config import ConfigError

VERIFY_RTOL = 1e-4  # relative to the largest logit; float32 runs give ~1e-7
# lower precisions round differently in the dense and the MoE forward; a wrong mapping is O(1)
LOW_PRECISION_RTOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moeflow upcycle", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("source", help="dense moeflow checkpoint / run dir, or Hugging Face model folder")
    p.add_argument("output", help="folder to create (must not exist unless --force)")
    p.add_argument("--format", choices=("auto", "moeflow", "hf", "both", "generic"), default="auto", help="auto: both for Llama-family HF folders, moeflow for moeflow checkpoints, generic for GPT-2")
    p.add_argument("--num-experts", type=int, default=8, help="copies of the dense MLP (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2; times --granularity)")
    p.add_argument("--gate", default="topk", help="gate from the registry (topk, dts, ...); HF export needs topk")
    p.add_argument("--gate-option", action="append", default=[], metavar="KEY=VALUE", help="gate constructor option (JSON value), repeatable")
    p.add_argument("--router-init", choices=("auto", "zero", "normal"), default="auto", help="auto: zero, or tied small-normal with --granularity > 1")
    p.add_argument("--router-std", type=float, default=0.02)
    p.add_argument("--expert-noise", type=float, default=0.0, help="relative noise added to each expert copy (default off; breaks exactness)")
    p.add_argument("--granularity", type=int, default=1, help="split each MLP into m experts of width F/m (top-k scaled by m)")
    p.add_argument("--shared-expert", action="store_true", help="keep the dense MLP as an always-on shared expert")
    p.add_argument("--shared-fraction", type=float, default=0.5, help="share of the output the shared expert keeps (default 0.5)")
    p.add_argument("--moe-every", type=int, default=1, help="upcycle every n-th MLP (default 1: all)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="precision to upcycle, verify and save the moeflow checkpoint in (default float32; bfloat16 halves memory for large models); HF exports keep the source's dtype")
    p.add_argument("--max-seq-len", type=int, default=None, help="moeflow model.max_seq_len (default: min(max_position_embeddings, sliding window, 4096))")
    p.add_argument("--generic", action="store_true", help="use the generic module-tree path (any architecture transformers can load)")
    p.add_argument("--selector", default=None, help="generic path: regex on module names selecting the MLPs")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip running dense vs upcycled on random tokens")
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
        num_experts=args.num_experts, top_k=args.top_k, gate=args.gate, gate_options=gate_options(args.gate_option),
        router_init=args.router_init, router_std=args.router_std, expert_noise=args.expert_noise, granularity=args.granularity,
        shared_expert=args.shared_expert, shared_fraction=args.shared_fraction, moe_every=args.moe_every, seed=args.seed,
    )


# --------------------------------------------------------------------------------------
# Sources


def detect(source: Path) -> str:
    if ckpt.find_checkpoint(source) is not None:
        return "moeflow"
    if (source / "config.json").is_file():
        return "hf"
    if not source.exists():
        raise UpcycleError(f"{source} does not exist; pass a moeflow checkpoint / run dir or a Hugging Face model folder")
    raise UpcycleError(f"{source} is neither a moeflow checkpoint (meta.json + model.safetensors, or a run dir with checkpoints/) nor a Hugging Face folder (config.json)")


def load_moeflow_dense(source: Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, dict]:
    from moeflow.moe.model import ModelConfig

    found = ckpt.find_checkpoint(source)
    meta = ckpt.read_meta(found)
    try:
        mc = ModelConfig(**{**meta["model"], "experts_impl": "torch"})  # CPU-safe; the trainer picks its own
    except (KeyError, TypeError, ValueError) as e:
        raise UpcycleError(f"{found}/meta.json has no usable model config ({e}); pass a checkpoint written by `moeflow train`") from None
    model = Transformer(mc)
    state = ckpt.load_model_state(found)
    ckpt.check_compatible(found, meta["model"], mc.to_dict(), state, model)
    model.load_state_dict(state, strict=False)
    return model.to(dtype).eval(), meta


# --------------------------------------------------------------------------------------
# Outputs


def model_yaml(cfg: dict) -> str:
    import yaml  # PyYAML comes with omegaconf

    body = {k: v for k, v in cfg.items() if k not in ("gate", "experts_impl", "experts_gather_rows")}  # not model.* keys
    return "# Written by `moeflow upcycle`: the upcycled MoE's shape (use with model=upcycled).\n" + yaml.safe_dump(body, sort_keys=False)


def gate_yaml(gate: dict) -> str:
    import yaml

    return "# Written by `moeflow upcycle`: the router of the upcycled MoE (use with gate=upcycled).\n" + yaml.safe_dump(gate, sort_keys=False)


def full_gate(opts: UpcycleOptions) -> dict:
    """The gate node with every constructor option spelled out (what the trainer's config holds)."""
    import inspect

    from moeflow.moe.gates import GATES, gate_options as accepted

    if opts.gate not in GATES:
        raise UpcycleError(f"gate {opts.gate!r} is unknown; known gates: {', '.join(sorted(GATES))}")
    params = inspect.signature(GATES[opts.gate]).parameters
    out = {"name": opts.gate}
    for name in sorted(accepted(opts.gate)):
        default = params[name].default
        if name in opts.gate_options:
            out[name] = opts.gate_options[name]
        elif default is not inspect.Parameter.empty and isinstance(default, (int, float, str, bool, type(None))):
            out[name] = default
    if "init_std" in out and "init_std" not in opts.gate_options:
        out["init_std"] = 0.0 if opts.resolved_router_init == "zero" else opts.router_std  # fresh runs of this config
    return out


def train_command(moeflow_dir: Path) -> str:
    d = moeflow_dir.resolve()
    return f"moeflow train hydra.searchpath=[file://{d / 'configs'}] model=upcycled gate=upcycled resume={d}"


def write_moeflow(folder: Path, moe: Transformer, opts: UpcycleOptions, source: Path) -> None:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    cfg = moe.cfg.to_dict()
    (folder / "configs" / "model").mkdir(parents=True)
    (folder / "configs" / "gate").mkdir(parents=True)
    (folder / "configs" / "model" / "upcycled.yaml").write_text(model_yaml(cfg))
    (folder / "configs" / "gate" / "upcycled.yaml").write_text(gate_yaml(cfg["gate"]))
    try:  # the generated configs must compose into a valid `moeflow train` config
        with initialize_config_module(config_module="moeflow.configs", version_base=None):
            train_cfg = compose(config_name="train", overrides=[f"hydra.searchpath=[file://{(folder / 'configs').resolve()}]", "model=upcycled", "gate=upcycled"])
        full = OmegaConf.to_container(train_cfg, resolve=True)
    except Exception as e:  # a generated config that does not compose is a bug: report it plainly
        raise UpcycleError(f"the generated Hydra configs do not compose ({' '.join(str(e).split())[:300]})") from None
    meta = {"model": cfg, "config": full, "weights_only": True, "upcycled_from": str(source), "upcycle": opts.to_dict()}
    ckpt.save_checkpoint(folder, 0, ckpt.unique_state_dict(moe), {}, meta, keep=0)
    (folder / "checkpoints" / "step_00000000" / "trainer_state.pt").unlink()  # weights only: training starts fresh


def atomic_output(output: Path, force: bool):
    """A temp folder next to OUTPUT, and a function that moves it into place."""
    if output.exists() and not force:
        raise UpcycleError(f"{output} already exists; choose a new output folder or pass --force to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".tmp-{output.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    def commit() -> None:
        old = output.parent / f".old-{output.name}-{os.getpid()}"
        if output.exists():
            os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)

    return tmp, commit


def check_verify(name: str, diff: dict, opts: UpcycleOptions, dtype: torch.dtype = torch.float32) -> None:
    rtol = LOW_PRECISION_RTOL.get(dtype, VERIFY_RTOL)
    print(f"verify {name}: max |logit diff| {diff['max_abs_diff']:.3e} (relative {diff['max_rel_diff']:.3e}) on {diff['tokens'][0]}x{diff['tokens'][1]} random tokens")
    if opts.exact and not diff["max_rel_diff"] <= rtol:
        raise UpcycleError(f"verification failed for {name}: relative logit difference {diff['max_rel_diff']:.3e} > {rtol:g} although the options promise an exact copy; nothing was written (report this, or pass --no-verify)")


def run(args: argparse.Namespace) -> dict:
    source, output = Path(args.source).expanduser(), Path(args.output).expanduser()
    opts = options_from(args)
    kind = detect(source)
    report: dict = {"source": str(source), "options": opts.to_dict(), "verify": {}}
    fmt = args.format
    if kind == "moeflow":
        if fmt not in ("auto", "moeflow"):
            raise UpcycleError(f"--format {fmt}: a moeflow checkpoint upcycles to moeflow format only (HF export needs a Llama-family HF source)")
        dense, _ = load_moeflow_dense(source, DTYPES[args.dtype])
        fmt, family_cfg = "moeflow", None
    else:
        family_cfg = hf.read_config(source)
        mt = family_cfg.get("model_type")
        if args.generic or mt in hf.GENERIC:
            if fmt not in ("auto", "generic"):
                raise UpcycleError(f"--format {fmt}: {mt!r} goes through the generic path, which writes --format generic only")
            return run_generic(source, output, opts, args, family_cfg, report)
        if mt not in hf.FAMILIES:
            raise UpcycleError(hf.supported_message(mt))
        if fmt == "generic":
            raise UpcycleError("--format generic needs --generic")
        if fmt == "auto":  # the HF MoE classes route like the renormalised topk gate only
            exportable = opts.gate == "topk" and opts.gate_options.get("renormalize", True)
            fmt = "both" if exportable else "moeflow"
        dense, _ = hf.load_dense(source, args.max_seq_len, DTYPES[args.dtype])

    opts_gate = full_gate(opts)
    opts = UpcycleOptions(**{**opts.to_dict(), "gate_options": {k: v for k, v in opts_gate.items() if k != "name"}})
    moe = upcycle_transformer(dense, opts).eval()
    tmp, commit = atomic_output(output, args.force)
    try:
        if args.verify:
            ref = dense_reference(source, kind, dense, DTYPES[args.dtype])
            seq = min(32, moe.cfg.max_seq_len)
            diff = max_logit_diff(ref, moe, moe.cfg.vocab_size, seq_len=seq, seed=args.seed)
            report["verify"]["moeflow"] = diff
            check_verify("moeflow MoE vs dense", diff, opts, DTYPES[args.dtype])
        mf_dir = tmp / "moeflow" if fmt == "both" else tmp
        hf_dir = tmp / "hf" if fmt == "both" else tmp
        if fmt in ("hf", "both"):
            config = hf.export_config(moe, family_cfg)
            hf.save_hf(hf_dir, config, hf.export_tensors(moe, config["model_type"], hf.dtype_of(family_cfg)), source)
            if args.verify and hf.dtype_of(family_cfg) != torch.float32:
                print(f"verify HF export: skipped ({hf.dtype_of(family_cfg)} weights round differently from the float32 reference)")
            elif args.verify:
                hf_moe = hf.load_hf_model(hf_dir)
                diff = max_logit_diff(ref, lambda t: hf_moe(t).logits, moe.cfg.vocab_size, seq_len=seq, seed=args.seed)
                report["verify"]["hf"] = diff
                check_verify(f"HF {config['model_type']} vs dense", diff, opts)
        if fmt in ("moeflow", "both"):
            mf_dir.mkdir(parents=True, exist_ok=True)
            write_moeflow(mf_dir, moe, opts, source)
            final_mf = output / "moeflow" if fmt == "both" else output
            report["train_command"] = train_command(final_mf)
        (tmp / "upcycle.json" if fmt != "hf" else tmp / "moeflow_upcycle.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {output} ({fmt}): {opts.total_experts} experts, top-{opts.active_experts}, gate {opts.gate}, {moe.num_params() / 1e6:.2f}M parameters ({moe.num_params(active_only=True) / 1e6:.2f}M active)")
    if "train_command" in report:
        print(f"continue training with (add your data=... and trainer.* overrides):\n  {report['train_command']}")
    return report


def dense_reference(source: Path, kind: str, dense: Transformer, dtype: torch.dtype = torch.float32):
    """The dense model to compare against: transformers' own when it is installed, else the converted one."""
    if kind == "hf":
        try:
            import transformers  # noqa: F401
        except ImportError:
            return dense
        ref = hf.load_hf_model(source, dtype)
        return lambda t: ref(t).logits
    return dense


def run_generic(source: Path, output: Path, opts: UpcycleOptions, args, cfg: dict, report: dict) -> dict:
    dense = hf.load_hf_model(source, DTYPES[args.dtype])
    model = hf.load_hf_model(source, DTYPES[args.dtype])
    replaced = upcycle_model(model, options=opts, selector=args.selector)
    model.eval()
    tmp, commit = atomic_output(output, args.force)
    try:
        if args.verify:
            vocab = int(cfg.get("vocab_size") or model.config.vocab_size)
            seq = min(32, int(cfg.get("n_positions") or cfg.get("max_position_embeddings") or 32))
            diff = max_logit_diff(lambda t: dense(t).logits, lambda t: model(t).logits, vocab, seq_len=seq, seed=args.seed)
            report["verify"]["generic"] = diff
            check_verify(f"upcycled {cfg.get('model_type')} vs dense", diff, opts, DTYPES[args.dtype])
        report["replaced_modules"] = replaced
        hf.save_generic(tmp, model, source, {"options": opts.to_dict(), "selector": args.selector, "report": report})
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {output} (generic): {len(replaced)} MLPs -> {opts.total_experts} experts, top-{opts.active_experts}; load with moeflow.moe.hf_convert.load_upcycled('{output}')")
    return report


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    try:
        torch.manual_seed(args.seed)
        run(args)
    except (UpcycleError, ConfigError, ckpt.CheckpointError) as e:
        print(f"moeflow upcycle: error: {e}", file=sys.stderr)
        sys.exit(2)
