"""Compare two training runs' loss curves from their TensorBoard event files (triton vs torch)."""

import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def curve(run_dir, tag):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def main(a, b):
    for tag in ("train/loss", "val/loss", "train/tokens_per_s"):
        ca, cb = curve(a, tag), curve(b, tag)
        steps = sorted(set(ca) & set(cb))
        print(f"## {tag}: step | {a} | {b} | diff")
        for s in steps:
            print(f"{s} | {ca[s]:.4f} | {cb[s]:.4f} | {ca[s] - cb[s]:+.4f}")
        if steps and tag.endswith("loss"):
            print(f"max |diff| = {max(abs(ca[s] - cb[s]) for s in steps):.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
