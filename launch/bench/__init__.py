"""`moeflow bench <what> [args]`: benchmarks of the kernels, the expert-parallel layer and the training step."""

from __future__ import annotations

import importlib

from moeflow.moe.errors import ConfigError

# what -> (module, function taking the remaining argv, one-line help)
BENCHES: dict[str, tuple[str, str, str]] = {
    "experts": ("moeflow.launch.bench.experts", "main", "expert MLP implementations vs the dense-GEMM ceiling"),
    "ep": ("moeflow.launch.bench.ep", "main", "one MoE layer under expert parallelism vs one GPU"),
    "train": (
        "moeflow.launch.bench.train",
        "main",
        "the whole training step: MoE vs its dense equivalent (and transformers, torchtitan), tokens/s and MFU",
    ),
    "checkpoint": (
        "moeflow.launch.bench.checkpoint",
        "main",
        "checkpoint save and load: moeflow's safetensors format vs DCP's pickle format",
    ),
}


def check_out(path: str | None, force: bool) -> None:
    """The results file, checked before the benchmark runs (not when its results are written, which
    would lose them): not a directory, replaced only with --force, and writable there. Nothing is
    created here: a refused run leaves no folder behind."""
    import os
    from pathlib import Path

    if path is None:
        return
    if not path.strip():
        raise ConfigError(
            "--out '' names no file; give a path such as --out bench/results/train.json, or leave --out off"
        )
    out = Path(path).absolute()
    if out.is_dir():
        raise ConfigError(f"--out {path} is a directory; name a file in it, e.g. --out {Path(path) / 'results.json'}")
    if out.exists():
        if not force:
            raise ConfigError(f"--out {path} already exists; pass --force to replace it, or choose another --out")
        if not os.access(out, os.W_OK):
            raise ConfigError(f"--out {path} cannot be written (no permission); choose another --out")
        return
    folder = next(f for f in out.parents if f.exists())  # the nearest that exists: the rest is made when writing
    if not folder.is_dir():
        raise ConfigError(f"--out {path}: {folder} is a file, not a folder; choose another --out")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {path}: {folder} is not writable; choose another --out")


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: moeflow bench <what> [args]\n\nbenchmarks:")
        for name, (_, _, help_) in BENCHES.items():
            print(f"  {name:<10} {help_}")
        return
    if argv[0] not in BENCHES:
        import difflib

        close = difflib.get_close_matches(argv[0], BENCHES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown benchmark {argv[0]!r}{hint}; choose one of: {', '.join(BENCHES)}")
    module, func, _ = BENCHES[argv[0]]
    getattr(importlib.import_module(module), func)(argv[1:])
