"""Run `moeflow ARGS` with Python's garbage collector timed (and, with `off`, disabled): a probe for whether
automatic collections stall the host inside the measured steps."""

import atexit
import gc
import sys
import time

from moeflow.launch.cli import main

mode, args = sys.argv[1], sys.argv[2:]
spent, began = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}, {}


def timed(phase, info):
    if phase == "start":
        began["t"] = time.perf_counter()
    else:
        s = spent[info["generation"]]
        s[0] += 1
        s[1] += time.perf_counter() - began["t"]


gc.callbacks.append(timed)
if mode == "off":
    gc.disable()
atexit.register(
    lambda: print(
        f"GC ({mode}): " + ", ".join(f"gen{g} {n} x {t * 1e3:.0f} ms" for g, (n, t) in spent.items()), flush=True
    )
)
main(args)
