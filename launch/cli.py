"""The `moeflow` command: `moeflow <subcommand> [args]`.

Each subcommand lives in its own module and is imported only when used, so
`moeflow train` does not pay for Ray or DeepSpeed imports.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module, function taking the remaining argv, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("moeflow.launch.train", "main", "train an MoE LM (Hydra overrides follow; `moeflow train --help`)"),
    "bench": ("moeflow.launch.bench", "main", "benchmarks (`moeflow bench --help`)"),
    "convert": ("moeflow.launch.convert", "main", "convert checkpoints: DeepSpeed/megatron-core <-> moeflow (`moeflow convert --help`)"),
    "upcycle": ("moeflow.launch.upcycle_cli", "main", "dense checkpoint (moeflow or Hugging Face) -> MoE (`moeflow upcycle --help`)"),
    "slurm": ("moeflow.launch.slurm", "main", "submit/status/cancel/logs of Slurm jobs (`moeflow slurm --help`)"),
    "ray": ("moeflow.launch.ray_launch", "main", "train on a Ray cluster: launch/submit/wait (`moeflow ray --help`)"),
    "stats": ("moeflow.launch.stats_table", "main", "per-layer routing statistics table of a run (`moeflow stats RUN_DIR [--step N]`)"),
}


def usage() -> str:
    lines = ["usage: moeflow <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"moeflow: unknown command {name!r}; commands: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module, func, _ = SUBCOMMANDS[name]
    getattr(importlib.import_module(module), func)(rest)


if __name__ == "__main__":
    main()
