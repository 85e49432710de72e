"""One upcycling run: read the dense source, build the MoE, verify it, write the chosen formats."""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

import torch

from moeflow.moe import hf_convert as hf
from moeflow.moe import hf_moe
from moeflow.moe.upcycle import UpcycleError, UpcycleOptions, max_logit_diff, upcycle_model, upcycle_transformer

from ..hf_models import round_parameters
from ..hf_models import verify as verify_export
from .outputs import atomic_output, full_gate, train_command, write_moeflow
from .sources import dense_reference, detect, load_moeflow_dense

VERIFY_RTOL = 1e-4  # relative to the largest logit; float32 runs give ~1e-7
# lower precisions round differently in the dense and the MoE forward; a wrong mapping is O(1)
LOW_PRECISION_RTOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_verify(name: str, diff: dict, opts: UpcycleOptions, dtype: torch.dtype = torch.float32) -> None:
    rtol = LOW_PRECISION_RTOL.get(dtype, VERIFY_RTOL)
    print(
        f"verify {name}: max |logit diff| {diff['max_abs_diff']:.3e} (relative {diff['max_rel_diff']:.3e}) on {diff['tokens'][0]}x{diff['tokens'][1]} random tokens"
    )
    if opts.exact and not diff["max_rel_diff"] <= rtol:
        raise UpcycleError(
            f"verification failed for {name}: relative logit difference {diff['max_rel_diff']:.3e} > {rtol:g} although the options promise an exact copy; nothing was written (report this, or pass --no-verify)"
        )


def run(args: argparse.Namespace, opts: UpcycleOptions) -> dict:
    source, output = Path(args.source).expanduser(), Path(args.output).expanduser()
    kind = detect(source)
    report: dict = {"source": str(source), "options": opts.to_dict(), "verify": {}}
    fmt = args.format
    if kind == "moeflow":
        if fmt not in ("auto", "moeflow"):
            raise UpcycleError(
                f"--format {fmt}: a moeflow checkpoint upcycles to moeflow format only (HF export needs a Llama-family HF source)"
            )
        dense, _ = load_moeflow_dense(source, DTYPES[args.dtype])
        fmt, family_cfg = "moeflow", None
    else:
        family_cfg = hf.read_config(source)
        mt = family_cfg.get("model_type")
        if args.generic or mt in hf.GENERIC:
            if fmt not in ("auto", "generic"):
                raise UpcycleError(
                    f"--format {fmt}: {mt!r} goes through the generic path, which writes --format generic only"
                )
            return run_generic(source, output, opts, args, family_cfg, report)
        if mt not in hf.FAMILIES:
            raise UpcycleError(hf.supported_message(mt))
        if fmt == "generic":
            raise UpcycleError("--format generic needs --generic")
        dense, _ = hf.load_dense(source, args.max_seq_len, DTYPES[args.dtype])

    opts_gate = full_gate(opts)
    opts = UpcycleOptions(**{**opts.to_dict(), "gate_options": {k: v for k, v in opts_gate.items() if k != "name"}})
    moe = upcycle_transformer(dense, opts).eval()
    if kind != "moeflow":  # an HF export is exact or not written
        target = hf.FAMILIES[family_cfg.get("model_type")]
        blockers = hf_moe.export_blockers(moe.cfg, target)
        if blockers and fmt in ("hf", "both"):
            raise UpcycleError(
                f"--format {fmt}: the upcycled model cannot be exported as {target} exactly: {'; '.join(blockers)}; use --format moeflow"
            )
        if fmt == "auto":
            fmt = "moeflow" if blockers else "both"
            if blockers:
                print(f"writing moeflow format only: no exact {target} export ({'; '.join(blockers)})")
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
            export_dtype = hf.dtype_of(family_cfg)
            config = hf_moe.export_config(moe.cfg, target, family_cfg)
            hf.save_hf(hf_dir, config, hf_moe.export_tensors(moe, target, export_dtype), source)
            if args.verify:  # transformers' model of the files against the moeflow model of the same weights
                mine = (
                    moe
                    if export_dtype == moe.embed.weight.dtype == torch.float32
                    else round_parameters(copy.deepcopy(moe).float(), export_dtype)
                )
                theirs = hf.load_hf_model(hf_dir)
                report["verify"]["hf"] = verify_export(
                    f"transformers {target} vs moeflow MoE",
                    lambda t: theirs(t).logits,
                    mine,
                    moe.cfg.vocab_size,
                    min(32, moe.cfg.max_seq_len),
                    args.seed,
                )
        if fmt in ("moeflow", "both"):
            mf_dir.mkdir(parents=True, exist_ok=True)
            write_moeflow(mf_dir, moe, opts, source)
            carry_source_tokenizer(source, kind, mf_dir)
            final_mf = output / "moeflow" if fmt == "both" else output
            report["train_command"] = train_command(final_mf)
        (tmp / "upcycle.json" if fmt != "hf" else tmp / "moeflow_upcycle.json").write_text(
            json.dumps(report, indent=2, default=str) + "\n"
        )
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"wrote {output} ({fmt}): {opts.total_experts} experts, top-{opts.active_experts}, gate {opts.gate}, {moe.num_params() / 1e6:.2f}M parameters ({moe.num_params(active_only=True) / 1e6:.2f}M active)"
    )
    if "train_command" in report:
        print(f"continue training with (add your data=... and trainer.* overrides):\n  {report['train_command']}")
    return report


def carry_source_tokenizer(source: Path, kind: str, folder: Path) -> None:
    """The dense model's tokenizer goes with the MoE (generate, data prepare and exports use it)."""
    from .. import checkpoint as ckpt
    from ..tokenizer_files import TOKENIZER_DIR, checkpoint_tokenizer, copy_tokenizer

    src = checkpoint_tokenizer(ckpt.find_checkpoint(source)) if kind == "moeflow" else source
    if src is not None:
        copy_tokenizer(src, folder / TOKENIZER_DIR)


def run_generic(source: Path, output: Path, opts: UpcycleOptions, args, cfg: dict, report: dict) -> dict:
    dense = hf.load_hf_model(source, DTYPES[args.dtype])
    # one load, copied: a head the checkpoint lacks (an encoder's LM head) is initialised randomly by
    # transformers, differently on each load; and the check compares the hidden states the upcycle changes
    model = copy.deepcopy(dense)
    replaced = upcycle_model(model, options=opts, selector=args.selector)
    model.eval()
    tmp, commit = atomic_output(output, args.force)
    try:
        if args.verify:
            vocab = int(cfg.get("vocab_size") or model.config.vocab_size)
            seq = min(32, int(cfg.get("n_positions") or cfg.get("max_position_embeddings") or 32))

            def last_hidden(m):
                return lambda t: m(t, output_hidden_states=True).hidden_states[-1]

            diff = max_logit_diff(last_hidden(dense), last_hidden(model), vocab, seq_len=seq, seed=args.seed)
            report["verify"]["generic"] = diff
            check_verify(
                f"upcycled {cfg.get('model_type')} vs dense (last hidden states)", diff, opts, DTYPES[args.dtype]
            )
        report["replaced_modules"] = replaced
        hf.save_generic(tmp, model, source, {"options": opts.to_dict(), "selector": args.selector, "report": report})
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"wrote {output} (generic): {len(replaced)} MLPs -> {opts.total_experts} experts, top-{opts.active_experts}; load with moeflow.moe.hf_convert.load_upcycled('{output}')"
    )
    return report
