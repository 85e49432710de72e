"""Markdown table of the per-gate runs made by bench/gates.sh (for bench/RESULTS.md).

Usage: python bench/tools/gates_summary.py OUT_DIR
Per run: step-0 and final val loss (train.log), mean over MoE layers of max/mean load,
dropped fraction and active experts per token at the last logged step (and the load
averaged over all logged steps)
(routing_stats.jsonl), and seconds per step: the median over logged intervals of
batch_size * seq_len / tokens_per_s (TensorBoard), and the mean over the whole loop
(train.log timestamps; includes evals and checkpoints).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from datetime import datetime
from pathlib import Path

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def summarize(run: Path) -> dict:
    log = (run / "train.log").read_text()
    val0 = float(re.search(r"step 0: val loss ([\d.]+)", log).group(1))
    finals = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", log)
    rows = [json.loads(line) for line in (run / "routing_stats.jsonl").read_text().splitlines() if line.strip()]
    last = max(r["step"] for r in rows)
    layers = [r for r in rows if r["step"] == last]
    mean = lambda key: statistics.fmean(r.get(key, 0.0) for r in layers)  # noqa: E731
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    tokens_per_step = cfg["data"]["batch_size"] * cfg["data"]["seq_len"] * cfg["trainer"]["grad_accum"]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tok_s = statistics.median(e.value for e in acc.Scalars("train/tokens_per_s"))
    stamp = lambda pattern: datetime.strptime(
        re.search(r"\[([\d\- :,]+)\]\[[^\]]+\]\[INFO\] - " + pattern, log).group(1), "%Y-%m-%d %H:%M:%S,%f"
    )  # noqa: E731
    loop_s = (stamp("done:") - stamp("step 0: val loss")).total_seconds()
    return {
        "gate": cfg["gate"]["name"],
        "steps": int(finals[-1][0]),
        "val0": val0,
        "val": float(finals[-1][1]),
        "load": mean("load_max_over_mean"),
        "load_all": statistics.fmean(r["load_max_over_mean"] for r in rows),
        "dropped": mean("dropped_fraction"),
        "active": mean("active_experts_per_token"),
        "s_per_step": tokens_per_step / tok_s,
        "mean_s_per_step": loop_s / int(finals[-1][0]),
    }


def main(out_dir: str) -> None:
    print(
        "| gate | steps | val loss step 0 -> final | max/mean load (last; mean of logged steps) | dropped | active experts/token | s/step median; mean |"
    )
    print("|---|---|---|---|---|---|---|")
    for run in sorted(p for p in Path(out_dir).iterdir() if (p / "train.log").exists()):
        try:
            s = summarize(run)
        except (AttributeError, IndexError, FileNotFoundError, KeyError) as e:
            print(f"| {run.name} | (incomplete: {e}) | | | | | |")
            continue
        print(
            f"| {run.name} | {s['steps']} | {s['val0']:.3f} -> {s['val']:.3f} | {s['load']:.2f}; {s['load_all']:.2f} | {s['dropped']:.3f} | {s['active']:.2f} | {s['s_per_step']:.2f}; {s['mean_s_per_step']:.2f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
