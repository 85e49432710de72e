"""DeepSpeed's JIT-built ops, built before a run uses them, and the stale build locks a killed build leaves."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("moeflow.deepspeed")


# -- DeepSpeed's JIT-built ops -----------------------------------------------------------
# DeepSpeed builds its CPU communication op with torch's JIT extension builder on first use.
# torch marks a build in progress with a `lock` file in the build directory, which a killed
# build leaves behind: every later run then waits on it forever. moeflow builds the ops first,
# one process at a time (an fcntl lock, released by the kernel when its holder dies), and
# before building removes a `lock` whose owner is gone: older than a live no-op load takes,
# and no process (ninja, the compiler) working in that directory.
JIT_OPS = ("ShareMemCommBuilder",)
STALE_AFTER_S = 30.0


def _busy(build_dir: Path) -> bool:
    """Whether any process has `build_dir` as its working directory (a build running there)."""
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if Path(os.readlink(cwd)) == build_dir:
                return True
        except OSError:
            continue
    return False


def clear_stale_build_lock(build_dir: Path) -> bool:
    """Remove torch's build lock in `build_dir` if its owner is gone; whether one was removed."""
    import time

    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_AFTER_S or _busy(build_dir):
        return False
    log.warning(
        "removing a stale DeepSpeed build lock %s (%.0f s old, no build running there: a killed build left it)",
        lock,
        age,
    )
    lock.unlink(missing_ok=True)
    return True


def build_ops(progress=print) -> list[str]:
    """Build (or load, when already built) the DeepSpeed ops moeflow's runs use; their names.
    Under torch.distributed every rank takes part (a barrier at the end: no rank's own DeepSpeed
    load overlaps another rank's stale-lock check)."""
    import fcntl

    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    built = []
    for op in JIT_OPS:
        builder = get_accelerator().create_op_builder(op)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue
        build_dir = Path(_get_build_directory(builder.NAME, False)).resolve()
        with open(build_dir.parent / f".moeflow-build-{builder.NAME}.lock", "w") as guard:
            fcntl.flock(
                guard, fcntl.LOCK_EX
            )  # another moeflow process building it: wait for it (it may die: then we get it)
            clear_stale_build_lock(build_dir)
            if not any(build_dir.glob("*.so")):
                progress(
                    f"moeflow: building DeepSpeed's {builder.NAME} op in {build_dir} (the first time only, ~1 min)"
                )
            builder.load(verbose=False)
        built.append(builder.NAME)
    if dist.is_initialized():
        dist.barrier()
    return built
