"""`moeflow stats RUN_DIR [--step N]`: per-layer routing statistics of a run as a table.

Reads the `routing_stats.jsonl` the trainer writes (one JSON row per MoE layer per
logged step) and prints, for one step (the last by default): tokens per expert
(min/mean/max), max/mean load, dropped fraction, router entropy, mean active experts per
token, the aux losses, and any other scalar the gate reports (temperature, ...).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moeflow.moe.errors import MoeflowError

FIXED = (
    "step",
    "layer",
    "tokens_per_expert",
    "load_max_over_mean",
    "dropped_fraction",
    "router_entropy",
    "active_experts_per_token",
)


class StatsError(MoeflowError):
    """A problem with the run dir or the step asked for; printed as one line."""


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "routing_stats.jsonl"
    if not path.is_file():
        raise StatsError(f"{path} not found; pass the run dir of a `moeflow train` run (it holds routing_stats.jsonl)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise StatsError(f"{path}:{n} is not valid JSON (a run killed mid-write?); delete that line") from None
    if not rows:
        raise StatsError(
            f"{path} is empty; the run logged no routing statistics yet (it logs every trainer.log_every steps)"
        )
    return rows


def rows_for_step(rows: list[dict], step: int | None) -> tuple[int, list[dict]]:
    steps = sorted({r["step"] for r in rows})
    step = steps[-1] if step is None else step
    if step not in steps:
        near = ", ".join(map(str, steps[-5:]))
        raise StatsError(f"step {step} was not logged; logged steps run {steps[0]}..{steps[-1]} (last ones: {near})")
    by_layer = {r["layer"]: r for r in rows if r["step"] == step}  # a resumed run may log a step twice: keep the last
    return step, [by_layer[k] for k in sorted(by_layer)]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def build_table(step: int, layer_rows: list[dict]) -> Table:
    losses = sorted({k for r in layer_rows for k in r if k.startswith("loss/")})
    extras = sorted(
        {
            k
            for r in layer_rows
            for k, v in r.items()
            if k not in FIXED and not k.startswith("loss/") and isinstance(v, (int, float))
        }
    )
    table = Table()
    for col in (
        "layer",
        "tokens/expert min/mean/max",
        "max/mean load",
        "dropped",
        "entropy",
        "active/token",
        *(k[5:] for k in losses),
        *extras,
    ):
        table.add_column(col, justify="right")
    for r in layer_rows:
        counts = r.get("tokens_per_expert") or [0]
        spread = f"{min(counts):.0f}/{sum(counts) / len(counts):.1f}/{max(counts):.0f}"
        cells = [str(r["layer"]), spread] + [
            _fmt(r.get(k, "-"))
            for k in ("load_max_over_mean", "dropped_fraction", "router_entropy", "active_experts_per_token")
        ]
        cells += [_fmt(r.get(k, "-")) for k in (*losses, *extras)]
        table.add_row(*cells)
    return table


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="moeflow stats", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a `moeflow train` run dir (holds routing_stats.jsonl)")
    parser.add_argument("--step", type=int, default=None, help="logged step to show (default: the last)")
    args = parser.parse_args(argv)
    step, layer_rows = rows_for_step(read_rows(args.run_dir), args.step)
    print(f"{args.run_dir}: routing statistics at step {step}")  # plain line: never wrapped
    Console(width=200).print(build_table(step, layer_rows))
