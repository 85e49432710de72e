"""`moeflow train --help`: what the command takes, group by group, in one screen (no torch import).

Each config group lists its choices with the first comment line of each choice's YAML file, so
the help stays what the shipped configs say. Hydra's own help is `moeflow train --hydra-help`.
"""

from __future__ import annotations

import importlib.resources

import yaml

GROUPS = ("model", "gate", "data", "optim", "parallel", "engine", "launcher")
NODES = {
    "experts": "expert kernels: impl (auto | triton | grouped_mm | torch), gather_rows",
    "trainer": "steps, grad_accum, eval/log/checkpoint cadence, device, precision, seed, progress, compile",
    "resume": "null (fresh) | auto (this run dir's latest checkpoint) | a run dir or checkpoint dir",
    "hydra.run.dir": "the run dir everything is written to (default outputs/<date>/<time>)",
}
DOCS = "docs: docs/configs.md (every key), docs/gates.md, docs/parallelism.md, docs/launchers.md, docs/engines.md"


def _first_comment(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def help_text() -> str:
    root = importlib.resources.files("moeflow.configs")
    defaults = {}
    for entry in yaml.safe_load((root / "train.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            defaults.update(entry)
    lines = [
        "usage: moeflow train [GROUP=CHOICE ...] [KEY=VALUE ...] [--cfg job] [-m]",
        "",
        "Train an MoE language model. Every option is a Hydra config key: override any with KEY=VALUE",
        "(e.g. model.num_experts=16 trainer.steps=1000); `moeflow train --cfg job` prints them all.",
        "",
        "config groups (GROUP=CHOICE):",
    ]
    for group in GROUPS:
        choices = sorted(p.name[: -len(".yaml")] for p in (root / group).iterdir() if p.name.endswith(".yaml"))
        lines.append(f"  {group}")
        for choice in choices:
            mark = "*" if defaults.get(group) == choice else " "
            lines.append(f"   {mark}{choice:<14} {_first_comment((root / group / f'{choice}.yaml').read_text())}")
    lines += ["", "other keys:"]
    lines += [f"  {key:<15} {what}" for key, what in NODES.items()]
    lines += ["", "* = the default. " + DOCS]
    return "\n".join(lines)
