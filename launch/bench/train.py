"""`moeflow bench train`: the whole training step, end to end, MoE against its dense equivalent.

Each moeflow variant runs the real trainer (`moeflow.launch.train.train`, the `moeflow train` code
path) on random tokens for 2 x --steps steps, logging once after the first --steps (warm-up:
compiles, autotuning) and once at the end; tokens/s is the second interval's. The outside models
(hf, torchtitan) run the same count of warm-up and measured steps in a plain loop. Variants:

- moe-<impl>: the MoE model with `experts.impl=<impl>` (--impls, default triton,grouped_mm on CUDA);
- dense: the same shape with one MLP of hidden top_k * d_ff per layer (`model.moe_every=0`):
  the same active FLOPs without routing;
- hf: transformers' own MoE model of the same shape (the class `moeflow convert` exports to: Mixtral,
  Qwen2-MoE, Qwen3-MoE or OLMoE) in a plain AdamW loop (bf16 autocast on CUDA, fp32 on a CPU), eager
  only, when transformers is installed and has a class that computes the model exactly;
- torchtitan: torchtitan's own MoE model of the same shape in the same loop, clipped as its trainer
  does, compiled by its own apply_compile when the moeflow rows are (`launch/bench/torchtitan_variant.py`),
  on CUDA when torchtitan is installed (`pip install moeflow[torchtitan]`); the JSON's
  `moe_over_torchtitan` compares the first MoE row with it.

MFU = (6 x active non-embedding parameters + attention) FLOPs per token x tokens/s, over a
matmul peak measured in the same run (bf16 8192^3 on CUDA; float32 1024^3 on a CPU, where the
figure only compares variants). Writes a JSON (--out) with the figures the RESULTS table uses.

Each variant also reports its steady step per phase (`forward_s`, `backward_s`, `optimizer_s`: the
mean over the measured steps, from CUDA events on a GPU, perf_counter on a CPU; `launch/profiling.py`).
Forward includes the batch's copy to the device, optimizer the clipping and the schedule; the three
add up to at most `steady_step_s`, which also holds logging and the host's gaps between steps.
With `trainer.profile=true` among the overrides, each trainer variant also prints its profile table
(top kernels by category) and keeps `profile_ms_per_step`; its tokens/s then includes the profiler.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from moeflow.moe.errors import ConfigError, ConversionError

from . import check_out
from .plain_loop import PHASES, phase_means, sync, time_plain_loop
from .torchtitan_variant import torchtitan_variant

# model overrides of the shapes in the issue tracker's targets
SHAPES = {
    "olmoe-like": ["model=olmoe_1b_7b", "model.n_layers=8", "gate.renormalize=false"],
    "mixtral-like": ["model=mixtral_8x7b", "model.n_layers=4"],
    "e128": ["model=qwen3_30b_a3b", "model.n_layers=8"],
    "tiny": ["model=tiny"],
}


def compose(overrides: list[str]):
    """The trainer's config, composed and checked as `moeflow train` does (Hydra's own keys removed)."""
    from omegaconf import OmegaConf

    from .. import schema
    from ..preflight import compose_checked

    cfg = compose_checked(overrides)
    schema.check(cfg)
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


def flops_per_token(model_cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 per active non-embedding parameter (the LM head counts: it is a
    matmul) plus attention scores and values, 12 * layers * heads * head_size * seq (no causal discount);
    the trainer's own count, which its log lines use for MFU."""
    from ..train import training_flops_per_token

    return training_flops_per_token(model_cfg, seq_len)


def matmul_peak(device) -> tuple[float, str]:
    """FLOP/s of one large matmul on this device (the MFU denominator), and what was measured."""
    import torch

    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 20
    else:
        n, dtype, reps = 1024, torch.float32, 5
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t), f"{str(dtype).replace('torch.', '')} {n}^3 matmul"


def random_tokens(folder: Path, vocab: int, n: int) -> Path:
    import numpy as np

    path = folder / "tokens.bin"
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    np.random.default_rng(0).integers(0, vocab, size=n, dtype=np.int64).astype(dtype).tofile(path)
    return path


VAL_PERCENT = 1


def token_count(batch_size: int, seq_len: int) -> int:
    """Random tokens to write: a few batches, and enough that the VAL_PERCENT validation split still
    holds a window of seq_len + 2 (the documented default, seq 2048, needs 410k)."""
    return max(4 * batch_size * (seq_len + 1), -(-100 * 2 * (seq_len + 2) // VAL_PERCENT), 200_000)


def trainer_variant(name: str, overrides: list[str], args, tokens: Path, run_root: Path) -> dict:
    """One variant through the real trainer; its tokens/s, first-step time, peak memory."""
    from moeflow.launch.config import model_config
    from moeflow.launch.out_of_memory import OutOfMemory
    from moeflow.launch.profiling import PhaseTimer, timing_phases
    from moeflow.launch.runtime import resolve_device
    from moeflow.launch.train import train
    from moeflow.moe.errors import Interrupted

    dtype = "uint16" if args.vocab_size is None or args.vocab_size <= 2**16 else "uint32"
    cfg = compose(
        [
            *overrides,
            "data=memmap",
            f"data.path={tokens}",
            f"data.dtype={dtype}",
            f"data.seq_len={args.seq_len}",
            f"data.batch_size={args.batch_size}",
            f"data.val_percent={VAL_PERCENT}",
            f"trainer.steps={2 * args.steps}",
            # the learning rate warms up over the bench's own warm-up steps: the default 30 would make every
            # short bench "all warmup" and say so (speed does not depend on the rate)
            f"optim.warmup_steps={args.steps}",
            f"trainer.log_every={args.steps}",
            "trainer.eval_every=0",
            "trainer.ckpt_every=0",
            "trainer.progress=false",
            f"trainer.device={args.device}",
            f"model.max_seq_len={args.seq_len}",
            *args.override,
        ]
    )
    model_cfg = model_config(cfg)
    timer = PhaseTimer(
        resolve_device(args.device, setting="--device"), first_step=args.steps
    )  # the measured steps, after as many warm-up ones
    try:
        with timing_phases(timer):
            result = train(cfg, run_root / name)
    except OutOfMemory as e:  # this variant does not fit this GPU: said in its row, the others still run
        return {"variant": name, "skipped": str(e), "params": _counts(model_cfg)}  # the caller frees its memory
    except Interrupted as e:  # the trainer's "resume with ..." names a temporary run dir that is about to go
        raise Interrupted(
            f"{name}: interrupted ({str(e).split(' after step')[0]}); the trainer's checkpoint went with the bench's "
            "temporary run dir, and no results file was written"
        ) from None
    tok_s = result.get("tokens_per_s")
    extra = {}
    if result.get("profile"):  # trainer.profile=true among the overrides: its table here (the run dir is temporary)
        profile_dir = Path(result["profile"]["trace"]).parent
        print(f"{name}: " + (profile_dir / "summary.txt").read_text(), flush=True)
        extra["profile_ms_per_step"] = result["profile"]["ms_per_step"]
        # each category's ten costliest kernels ([name, ms per step, calls per step]): the table shows two
        extra["profile_top"] = json.loads((profile_dir / "summary.json").read_text())["top"]
    return {
        "variant": name,
        "tokens_per_s": tok_s,
        "first_step_s": result.get("first_step_s"),
        "steady_step_s": (args.batch_size * args.seq_len / tok_s) if tok_s else None,
        "peak_mem_gib": result.get("peak_mem_gib"),
        "flops_per_token": flops_per_token(model_cfg, args.seq_len),
        "params": _counts(model_cfg),
        "final_loss": result.get("train_loss"),
        **phase_means(timer),
        **extra,
    }


def _counts(model_cfg) -> dict:
    from moeflow.moe.param_count import param_counts

    total, active = param_counts(model_cfg)
    return {"total": total, "active": active}


def hf_variant(cfg, args, device) -> dict:
    """transformers' own MoE model of cfg's shape (the run's composed model config), in a plain AdamW loop
    (bf16 autocast on CUDA, fp32 on a CPU), eager: trainer.compile does not reach it."""
    import torch

    from moeflow.moe.hf_moe import auto_target, export_config

    try:
        import transformers
    except ImportError:
        return {"variant": "hf", "skipped": "transformers is not installed"}
    try:
        target = auto_target(cfg)
        exported = export_config(cfg, target)
    except (ConfigError, ConversionError) as e:  # no transformers class computes this model exactly (a gate it lacks)
        return {"variant": "hf", "skipped": f"no transformers model of this shape: {e}"}
    hf_cfg = transformers.AutoConfig.for_model(
        **{k: v for k, v in exported.items() if k not in ("architectures", "torch_dtype")}
    )
    torch.manual_seed(0)
    kwargs = {}
    if device.type == "cuda":
        kwargs["experts_implementation"] = "grouped_mm"  # transformers' fastest MoE path
    try:
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, **kwargs).to(device)
    except (TypeError, ValueError):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg).to(device)
    timed = time_plain_loop(lambda m, tokens: m(tokens).logits, model, cfg.vocab_size, args, device)
    return _with_shape_counts({"variant": f"hf ({target})", **timed}, cfg, args)


VARIANTS = ("moe", "dense", "hf", "torchtitan")


def _with_shape_counts(row: dict, model_cfg, args) -> dict:
    """An outside model's row with the shape's FLOPs and moeflow's parameter counts (MFU on one basis)."""
    return (
        row
        if row.get("skipped")
        else {**row, "flops_per_token": flops_per_token(model_cfg, args.seq_len), "params": _counts(model_cfg)}
    )


def _refuse_a_shape_that_cannot_fit(shape_cfg, moe_cfg, device) -> None:
    """The trainer's own memory check, before the first row: the bench runs one process, so its fix is a
    smaller --shape (or fewer layers), not the trainer's "more ranks"."""
    from moeflow.launch.config import check_memory

    try:
        check_memory(shape_cfg, moe_cfg, device)
    except ConfigError as e:
        raise ConfigError(
            str(e).replace(
                "or more ranks", "--shape tiny, or fewer layers (model.n_layers=N): the bench runs one process"
            )
        ) from None


def run(args) -> dict:
    import torch

    from moeflow.launch.config import resolve_experts_impl
    from moeflow.launch.runtime import resolve_device

    if args.shape not in SHAPES:
        raise ConfigError(f"--shape {args.shape!r} is unknown; choose one of {', '.join(SHAPES)}")
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants: {unknown[0]!r} is unknown; use {', '.join(VARIANTS)}")
    if args.impls is not None and not args.impls.strip(", "):
        raise ConfigError("--impls is empty; name one or more of triton, grouped_mm, torch (or leave the flag out)")
    for flag, listed in (("--variants", variants), ("--impls", (args.impls or "-").split(","))):
        if len(set(listed)) < len(listed):
            twice = next(v for v in listed if listed.count(v) > 1)
            raise ConfigError(f"{flag}: {twice!r} is listed twice; each is one row, list it once")
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    _refuse_overrides_the_bench_sets(args.override, variants, getattr(args, "compile", False))
    device = resolve_device(args.device, setting="--device")
    impls = args.impls.split(",") if args.impls else (["triton", "grouped_mm"] if device.type == "cuda" else ["torch"])
    _refuse_impls_that_would_fall_back(impls, device)
    for impl in impls:  # every one before the first row runs (a typo in the last would lose the others' rows)
        resolve_experts_impl(impl, device)
    shape = SHAPES[args.shape]
    from moeflow.launch.config import model_config

    shape_cfg = compose([*shape, f"model.max_seq_len={args.seq_len}", f"trainer.device={args.device}", *args.override])
    moe_cfg = model_config(shape_cfg)
    _refuse_a_shape_that_cannot_fit(shape_cfg, moe_cfg, device)
    vocab = moe_cfg.vocab_size
    args.vocab_size = vocab
    compiled_by_override = bool(shape_cfg.trainer.compile)
    peak, peak_what = matmul_peak(device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="moeflow-bench-train-") as tmp:
        tmp = Path(tmp)
        # enough tokens that the 1% validation split still holds a window of seq_len + 2
        tokens = random_tokens(tmp, vocab, token_count(args.batch_size, args.seq_len))
        modes = [("", [])] + ([("-compiled", ["trainer.compile=true"])] if getattr(args, "compile", False) else [])

        def measured(row: dict) -> None:  # each variant's peak memory its own: release before the next
            row["compiled"] = row["variant"].endswith("-compiled") or (
                compiled_by_override and not row["variant"].startswith("hf")
            )
            rows.append(row)
            print(_row(row, peak), flush=True)
            _release(device)

        for variant in args.variants.split(","):
            for suffix, extra in modes if variant in ("moe", "dense") else [("", [])]:
                if variant == "moe":
                    for impl in impls:
                        measured(
                            trainer_variant(
                                f"moe-{impl}{suffix}", [*shape, f"experts.impl={impl}", *extra], args, tokens, tmp
                            )
                        )
                elif variant == "dense":
                    measured(
                        trainer_variant(f"dense{suffix}", [*shape, "model.moe_every=0", *extra], args, tokens, tmp)
                    )
                elif variant == "hf":
                    measured(hf_variant(moe_cfg, args, device))
                else:  # torchtitan: compiled as the moeflow rows are (their override, or --compile beside eager)
                    titan_modes = [True] if compiled_by_override else [False] + ([True] if len(modes) > 1 else [])
                    for compiled in titan_modes:
                        row = torchtitan_variant(moe_cfg, args, device, compiled)
                        measured(_with_shape_counts(row, moe_cfg, args))
                        for difference in row.get("differences", []):
                            print(f"  {row['variant']}: {difference}", flush=True)
    for r in rows:
        if r.get("tokens_per_s"):
            r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak
    moe = next(
        (
            r
            for r in rows
            if r["variant"].startswith("moe") and not r["variant"].endswith("-compiled") and r.get("tokens_per_s")
        ),
        None,
    )
    dense = next((r for r in rows if r["variant"] == "dense" and r.get("tokens_per_s")), None)
    moe_c = next(
        (
            r
            for r in rows
            if r["variant"].startswith("moe") and r["variant"].endswith("-compiled") and r.get("tokens_per_s")
        ),
        None,
    )
    dense_c = next((r for r in rows if r["variant"] == "dense-compiled" and r.get("tokens_per_s")), None)
    titan = next((r for r in rows if r["variant"] == "torchtitan" and r.get("tokens_per_s")), None)
    titan_c = next((r for r in rows if r["variant"] == "torchtitan-compiled" and r.get("tokens_per_s")), None)
    # the moe row against torchtitan compiled the same way (the moe row is compiled when trainer.compile=true)
    titan_same = titan_c if compiled_by_override else titan
    out = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "shape": args.shape,
        # the composed model (the --shape preset with any model.* overrides): what the rows actually ran
        "model": {
            k: getattr(moe_cfg, k)
            for k in ("n_layers", "d_model", "n_heads", "num_experts", "top_k", "d_ff", "moe_every", "vocab_size")
        },
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps_measured": args.steps,
        "impls": impls,
        "overrides": list(
            args.override
        ),  # trainer.profile=true among them: the profiled rows' tokens/s include the profiler
        "peak_flops": peak,
        "peak_measured_with": peak_what,
        "moe_tokens_per_s": moe and moe["tokens_per_s"],
        "dense_tokens_per_s": dense and dense["tokens_per_s"],
        "moe_mfu": moe and moe.get("mfu"),
        "dense_mfu": dense and dense.get("mfu"),
        "moe_over_dense": moe and dense and moe["tokens_per_s"] / dense["tokens_per_s"],
        "moe_peak_mem_gib": moe and moe.get("peak_mem_gib"),
        "first_step_s": moe and moe.get("first_step_s"),
        "moe_phases_s": moe and {p: moe.get(f"{p}_s") for p in PHASES},
        "dense_phases_s": dense and {p: dense.get(f"{p}_s") for p in PHASES},
        "moe_compiled_tokens_per_s": moe_c and moe_c["tokens_per_s"],
        "dense_compiled_tokens_per_s": dense_c and dense_c["tokens_per_s"],
        "moe_compiled_over_dense_compiled": moe_c and dense_c and moe_c["tokens_per_s"] / dense_c["tokens_per_s"],
        "torchtitan_tokens_per_s": titan and titan["tokens_per_s"],
        "torchtitan_compiled_tokens_per_s": titan_c and titan_c["tokens_per_s"],
        "moe_over_torchtitan": moe and titan_same and moe["tokens_per_s"] / titan_same["tokens_per_s"],
        "moe_compiled_over_torchtitan_compiled": moe_c and titan_c and moe_c["tokens_per_s"] / titan_c["tokens_per_s"],
        "variants": rows,
    }
    if out["moe_over_dense"]:
        both = " (both compiled: trainer.compile=true)" if compiled_by_override else ""
        print(f"MoE ({moe['variant']}) / dense tokens/s{both}: x{out['moe_over_dense']:.3f}")
    if out["moe_compiled_over_dense_compiled"]:
        print(f"MoE ({moe_c['variant']}) / dense, both compiled: x{out['moe_compiled_over_dense_compiled']:.3f}")
    if out["moe_over_torchtitan"]:
        both = " (both compiled: trainer.compile=true)" if compiled_by_override else ""
        print(f"MoE ({moe['variant']}) / {titan_same['variant']} tokens/s{both}: x{out['moe_over_torchtitan']:.3f}")
    if out["moe_compiled_over_torchtitan_compiled"]:
        print(
            f"MoE ({moe_c['variant']}) / torchtitan, both compiled: x{out['moe_compiled_over_torchtitan_compiled']:.3f}"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")
    return out


# settings the bench makes itself: an override of one would run something other than what the row reports
# (a batch the step time was not computed from, a row named moe-triton running torch, a "dense" row with experts)
_BENCH_SETS = {
    "data.seq_len": "--seq-len",
    "model.max_seq_len": "--seq-len",
    "data.batch_size": "--batch-size",
    "data.global_batch_size": "--batch-size",
    "trainer.grad_accum": "--batch-size",
    "trainer.steps": "--steps",
    "trainer.log_every": "--steps",
    "trainer.device": "--device",
    "experts.impl": "--impls",
}
_BENCH_OWNS = {  # prefix -> what the bench does with it
    "data": "reads its own token file",
    "launcher": "runs one process",
    "hydra.run": "runs in a temporary dir",
    "hydra.sweep": "runs in a temporary dir",
    "resume": "starts every variant fresh",
    "trainer.eval_every": "measures steps without evaluation",
    "trainer.ckpt_every": "measures steps without checkpoints",
}


def _refuse_overrides_the_bench_sets(overrides: list[str], variants: list[str], compile_flag: bool) -> None:
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0].strip()
        flag = _BENCH_SETS.get(key)
        if flag:
            raise ConfigError(f"{override}: the bench sets {key} itself; use {flag}")
        owned = next((what for k, what in _BENCH_OWNS.items() if key == k or key.startswith(k + ".")), None)
        if owned:
            raise ConfigError(
                f"{override}: the bench sets {key} itself (it {owned}); drop it, or measure with `moeflow train` and "
                f"trainer.profile=true"
            )
        if key == "model.moe_every" and "dense" in variants:
            raise ConfigError(f"{override}: the dense variant sets model.moe_every=0; run it without --variants dense")
        if key == "trainer.compile" and compile_flag:
            raise ConfigError(
                f"{override} with --compile: --compile adds compiled rows beside eager ones; use one of them"
            )


def _refuse_impls_that_would_fall_back(impls: list[str], device) -> None:
    """A row named moe-triton must have run the Triton kernels: on a CPU (without Triton's interpreter)
    the experts fall back to the torch path, so the bench refuses rather than mislabel the row."""
    from moeflow.kernels.autotune import INTERPRET

    cuda_only = [i for i in impls if i in ("triton", "grouped_mm")]
    if device.type != "cuda" and cuda_only and not (INTERPRET and cuda_only == ["triton"]):
        raise ConfigError(
            f"--impls {','.join(cuda_only)} runs only on a CUDA GPU (on {device.type} it would fall back to "
            f"experts.impl=torch under its name); use --impls torch here"
        )


def _release(device) -> None:
    """Free what the last variant left cached, so the next one's peak memory is its own."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _row(r: dict, peak: float) -> str:
    if r.get("skipped"):
        return f"{r['variant']:<16} skipped: {r['skipped']}"
    mfu = r["tokens_per_s"] * r["flops_per_token"] / peak if r.get("tokens_per_s") else float("nan")
    mem = f"{r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else "n/a (CUDA only)"
    phases = " / ".join(f"{1e3 * r[f'{p}_s']:.1f}" if r.get(f"{p}_s") is not None else "-" for p in PHASES)
    return (
        f"{r['variant']:<16} {r['tokens_per_s']:>12,.0f} tok/s  MFU {100 * mfu:5.1f}%  step {1e3 * r['steady_step_s']:8.1f} ms  "
        f"(fwd / bwd / opt {phases} ms)  "
        f"first step {r['first_step_s']:6.1f} s  peak {mem}  ({r['params']['active'] / 1e6:.1f}M active of {r['params']['total'] / 1e6:.1f}M)"
        + ("  [profiled: its tok/s include the profiler's overhead]" if r.get("profile_ms_per_step") else "")
    )


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(
        prog="moeflow bench train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", default="olmoe-like", help=f"model shape: {', '.join(SHAPES)} (default olmoe-like)")
    ap.add_argument(
        "--variants",
        default="moe,dense,hf,torchtitan",
        help="comma list of moe, dense, hf, torchtitan (default: all four; hf and torchtitan say 'skipped' "
        "where they can't run)",
    )
    ap.add_argument(
        "--impls",
        default=None,
        help="experts.impl values for the MoE variant (default: triton,grouped_mm on CUDA, torch on CPU)",
    )
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    ap.add_argument("--steps", type=int, default=10, help="measured steps, after as many warm-up steps (default 10)")
    ap.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu or cuda (default auto)")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also run the moe and dense variants with trainer.compile=true (and torchtitan compiled by its own apply_compile)",
    )
    ap.add_argument("--out", default=None, help="JSON file to write (e.g. bench/results/train_h200.json)")
    ap.add_argument(
        "override",
        nargs="*",
        help="extra Hydra overrides for every moeflow variant (e.g. trainer.compile=true); model.* and gate.* shape the "
        "hf and torchtitan rows too, trainer.compile compiles the torchtitan row (hf runs eager), other settings are "
        "moeflow's only (the torchtitan row lists them); each row's 'compiled' says how it ran",
    )
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = ap.parse_intermixed_args(argv)  # overrides before or after the flags
    check_out(args.out, args.force)
    run(args)
