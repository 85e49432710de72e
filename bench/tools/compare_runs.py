"""Compare two training runs' loss curves from their TensorBoard event files (triton vs torch, default vs
an optimizer option): per logged step, the largest gap, and the mean train loss over the second half of
the run (one step's loss is too noisy to compare on its own). The device scripts call this one."""

import statistics
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
        late = steps[len(steps) // 2 :]
        if late and tag == "train/loss":
            ma, mb = statistics.mean(ca[s] for s in late), statistics.mean(cb[s] for s in late)
            print(f"mean {tag}, steps {late[0]}-{late[-1]}: {ma:.4f} | {mb:.4f} | {(mb - ma) / ma:+.1%}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
