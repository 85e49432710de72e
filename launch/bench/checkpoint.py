"""`moeflow bench checkpoint`: what a save and a load of model + AdamW state cost, moeflow's
format (safetensors shards, JSON index, sha256 per file) against torch.distributed.checkpoint's
own pickle-based FileSystemWriter/Reader (moeflow's format before; the reference), same state,
same process, same disk.

    moeflow bench checkpoint [--d-model 512] [--layers 4] [--experts 16] [--repeats 5] [--dir DIR] [--out results.json]

Every figure is the median over --repeats; each save is fsync'd by both writers. Loads read
from the page cache (a just-written file), so they measure parsing and copying, not the disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from . import check_out


def _state(d_model: int, layers: int, experts: int, seed: int = 0):
    import torch

    from moeflow.moe.model import ModelConfig, Transformer
    from moeflow.parallel.checkpoint import model_and_optimizer_state

    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=4096,
        d_model=d_model,
        n_layers=layers,
        n_heads=max(1, d_model // 64),
        d_ff=d_model * 2,
        num_experts=experts,
    )
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    model(x).float().logsumexp(-1).mean().backward()
    opt.step()
    return model, opt, model_and_optimizer_state


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str]) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    from moeflow.parallel import checkpoint as sharded

    ap = argparse.ArgumentParser(prog="moeflow bench checkpoint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    check_out(args.out, args.force)

    model, opt, state_of = _state(args.d_model, args.layers, args.experts)
    state = state_of(model, opt)
    tensors, _ = sharded.split_state(state)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    root = Path(args.dir or tempfile.mkdtemp(prefix="moeflow-bench-ckpt-"))
    root.mkdir(parents=True, exist_ok=True)

    def fresh(name: str) -> Path:
        p = root / name
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
        return p

    def load_target():
        return state_of(model, opt)

    runs: dict[str, list[float]] = {k: [] for k in ("ref_save", "ref_load", "save", "load_verified", "load_unverified")}
    with sharded._single_process_quietly():  # DCP warns on every single-process call that it is one
        try:
            for _ in range(args.repeats):
                ref = fresh("reference")
                runs["ref_save"].append(_time(lambda: dcp.save(state, checkpoint_id=str(ref), no_dist=True)))
                target = load_target()
                runs["ref_load"].append(_time(lambda: dcp.load(target, checkpoint_id=str(ref), no_dist=True)))
                ours = fresh("moeflow")
                runs["save"].append(_time(lambda: sharded.save_sharded(ours, state)))
                target = load_target()
                runs["load_verified"].append(_time(lambda: sharded.load_sharded(ours, target, verify=True)))
                target = load_target()
                runs["load_unverified"].append(_time(lambda: sharded.load_sharded(ours, target, verify=False)))
            other, other_opt, _ = _state(
                args.d_model, args.layers, args.experts, seed=1
            )  # another model: the load must overwrite it
            check = state_of(other, other_opt)
            sharded.load_sharded(ours, check)
            got = sharded.split_state(check)[0]
            same = got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
        finally:
            if args.dir is None:
                shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    spread = {k: [min(v), max(v)] for k, v in runs.items()}
    result = {
        "state_bytes": nbytes,
        "repeats": args.repeats,
        "dir": str(root),
        "seconds": med,
        "min_max": spread,
        "reloaded_equal": same,
        "save_vs_reference": med["save"] / med["ref_save"],
        "load_vs_reference": med["load_verified"] / med["ref_load"],
        "load_unverified_vs_reference": med["load_unverified"] / med["ref_load"],
    }
    print(
        f"state: {nbytes / 2**20:.1f} MiB of tensors (model + AdamW), median of {args.repeats}; reload bit-identical: {same}"
    )
    print(f"{'':24}{'seconds':>10}{'GiB/s':>9}{'x reference':>13}   min-max s")
    for name, key, ref in (
        ("reference save (pickle)", "ref_save", None),
        ("moeflow save (+digest)", "save", "ref_save"),
        ("reference load (pickle)", "ref_load", None),
        ("moeflow load, verified", "load_verified", "ref_load"),
        ("moeflow load, no verify", "load_unverified", "ref_load"),
    ):
        ratio = f"{med[key] / med[ref]:.2f}" if ref else "1.00"
        print(
            f"{name:<24}{med[key]:>10.3f}{nbytes / 2**30 / med[key]:>9.2f}{ratio:>13}   {spread[key][0]:.3f}-{spread[key][1]:.3f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
