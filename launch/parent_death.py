"""A rank dies with its launcher: a torchrun killed on its own never leaves ranks training on.

torchrun's ranks are its children. Linux's parent-death signal (prctl PR_SET_PDEATHSIG) kills a
rank the moment its launcher exits, however it exits. Armed as the `moeflow` command starts
(before torch is imported), and again when a run joins its process group.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def exit_with_launcher() -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID set) on Linux: SIGKILL this process when its parent dies."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the signal was armed
        os._exit(1)
