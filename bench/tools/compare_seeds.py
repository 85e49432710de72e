"""Triton vs reference training runs over several seeds: is the loss gap systematic or noise?

    python bench/tools/compare_seeds.py ROOT  (runs in ROOT/<impl>_s<seed>/tensorboard)

Prints per seed: val loss at each eval step and the mean train loss of the last 50 steps
per impl, and the triton - torch gap; then the gap's mean and spread over seeds next to
the seed-to-seed spread of each impl (what "same curve within noise" is measured against).
"""

import statistics
import sys
from pathlib import Path

from compare_runs import curve


def main(root: str) -> None:
    runs = {}
    for d in sorted(Path(root).glob("*_s*")):
        impl, seed = d.name.rsplit("_s", 1)
        runs.setdefault(impl, {})[int(seed)] = d / "tensorboard"
    impls = sorted(runs)
    seeds = sorted(set.intersection(*(set(r) for r in runs.values())))
    tail = {}
    print(
        "| seed | "
        + " | ".join(f"{i} val (steps) | {i} train last-50 mean" for i in impls)
        + " | gap train (triton - torch) |"
    )
    for s in seeds:
        cells = []
        for i in impls:
            val = curve(str(runs[i][s]), "val/loss")
            tr = curve(str(runs[i][s]), "train/loss")
            last = [v for k, v in tr.items() if k > max(tr) - 50]
            tail[(i, s)] = statistics.mean(last)
            cells += [" ".join(f"{v:.4f}@{k}" for k, v in sorted(val.items())), f"{tail[(i, s)]:.4f}"]
        gap = (
            tail[("triton", s)] - tail[("torch", s)] if ("triton", s) in tail and ("torch", s) in tail else float("nan")
        )
        print(f"| {s} | " + " | ".join(cells) + f" | {gap:+.4f} |")
    if len(seeds) > 1 and "triton" in runs and "torch" in runs:
        gaps = [tail[("triton", s)] - tail[("torch", s)] for s in seeds]
        print(f"gap mean {statistics.mean(gaps):+.4f}, stdev {statistics.stdev(gaps):.4f} over {len(seeds)} seeds")
        for i in impls:
            print(f"{i}: seed-to-seed stdev of the last-50 mean {statistics.stdev(tail[(i, s)] for s in seeds):.4f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(sys.argv[1])
