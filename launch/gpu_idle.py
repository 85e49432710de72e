"""Where the GPU waited for the host during a profiled window (`trainer.profile=true`).

Kernel time per category (`launch/profiling.py`) cannot show a step that is slow because the GPU sat
idle: a host sync, Python between launches, a launch queue that ran dry. This reads the chrome trace
torch.profiler wrote, takes the union of everything the GPU ran (kernels, copies, fills), and names,
for each idle gap, the host op or annotation running at its midpoint (outermost > innermost), so
the cause reads as e.g. "aten::item > cudaStreamSynchronize 3.1 ms/step" or "(no host op: Python
between ops)".
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver", "python_function")
NO_HOST_OP = "(no host op: Python between ops)"
MIN_GAP_US = 20.0  # shorter gaps are the launch latency between back-to-back kernels


def _intervals(events: list[dict], categories: tuple[str, ...]) -> list[tuple[float, float, str, tuple]]:
    """(start, end, name, thread) of the complete events of `categories` (times in microseconds)."""
    return [
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), e.get("name", "?"), (e.get("pid"), e.get("tid")))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in categories
    ]


def _merged(spans: list[tuple]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b, *_ in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _host_at(times: list[float], host: list[tuple[float, float, str, tuple]]) -> list[str]:
    """What the host was doing at each of `times` (ascending): on the thread whose innermost op there
    began last (the one still issuing work; the others wait inside long ops), its outermost op or
    annotation covering that time (ops nest in time on a thread) and, when another lies inside it, the
    innermost ("Optimizer.step > cudaStreamSynchronize"). One sweep over the host ops sorted by start."""
    host = sorted(host, key=lambda h: h[0])
    out, active, i = [], [], 0
    for t in times:
        while i < len(host) and host[i][0] <= t:
            active.append(host[i])
            i += 1
        active = [h for h in active if h[1] >= t]
        threads: dict[tuple, list] = {}
        for h in active:
            threads.setdefault(h[3], []).append(h)
        if not threads:
            out.append(NO_HOST_OP)
            continue
        ops = max(threads.values(), key=lambda hs: min(hs, key=lambda h: h[1] - h[0])[0])
        inner = min(ops, key=lambda h: h[1] - h[0])[2]
        outer = max(ops, key=lambda h: h[1] - h[0])[2]
        out.append(outer if inner == outer else f"{outer} > {inner}")
    return out


def idle_report(trace: dict | str | Path, steps: int) -> dict:
    """GPU-idle figures of a chrome trace covering `steps` steps: the window from the first device op
    to the last, the idle time in it, and idle time per cause (ms per step), largest first."""
    if not isinstance(trace, dict):
        trace = json.loads(Path(trace).read_text())
    events = trace.get("traceEvents", [])
    device = _intervals(events, DEVICE_CATEGORIES)
    if not device:
        return {}
    busy = _merged(device)
    window_us = busy[-1][1] - busy[0][0]
    host = _intervals(events, HOST_CATEGORIES)
    gaps = [(end, start) for (_, end), (start, _) in zip(busy, busy[1:])]
    idle_us = sum(start - end for end, start in gaps)
    long = [(end, start) for end, start in gaps if start - end >= MIN_GAP_US]
    causes: dict[str, float] = defaultdict(float)
    for (end, start), what in zip(long, _host_at([(end + start) / 2 for end, start in long], host)):
        causes[what] += start - end
    return {
        "window_ms_per_step": window_us / 1e3 / steps,
        "idle_ms_per_step": idle_us / 1e3 / steps,
        "idle_share": idle_us / window_us if window_us else 0.0,
        "causes_ms_per_step": {k: v / 1e3 / steps for k, v in sorted(causes.items(), key=lambda kv: -kv[1])},
    }


def format_idle(report: dict, top: int = 4) -> str:
    """One line for the profile table: idle ms per step, its share, and the top causes."""
    if not report:
        return ""
    causes = "; ".join(f"{name[:60]} {ms:.2f}" for name, ms in list(report["causes_ms_per_step"].items())[:top])
    return (
        f"GPU idle {report['idle_ms_per_step']:.2f} ms/step ({100 * report['idle_share']:.1f}% of "
        f"{report['window_ms_per_step']:.1f} ms), while the host ran: {causes or '-'}"
    )
