"""One knob for every time limit in the suite: MOEFLOW_TEST_TIMEOUT_SCALE.

Each limit in the tests is the time the step takes on a quiet 2-core machine with room to
spare; `limit(s)` multiplies it by the scale (default 2: a busy machine, a first-use JIT build).
Raise it on a slower machine, e.g. MOEFLOW_TEST_TIMEOUT_SCALE=4 bash .ci/run.
"""

from __future__ import annotations

import os

SCALE = float(os.environ.get("MOEFLOW_TEST_TIMEOUT_SCALE", "2"))


def limit(seconds: float) -> float:
    return seconds * SCALE
