"""Where a training step's time goes: `trainer.profile=true` and the phase times of `moeflow bench train`.

`StepProbe` is all the training loop sees: `begin(step)` at the top of a step and `end(done, result)`
after its optimizer step. It drives two optional instruments, both off in a normal run (no host
sync, no profiler):

- `trainer.profile=true`: torch.profiler (CPU ops, and CUDA kernels on a GPU) over a few steady
  steps (`profile_window`: step indices 3-5 after the start, the log's steps 4-6; fewer in a short
  run). It writes a Chrome trace (`<run_dir>/profile/trace.json`, `trace_rank<r>.json` under
  torchrun; open it in chrome://tracing or https://ui.perfetto.dev) and `summary.txt` /
  `summary.json`, and logs the top kernels per step grouped into categories (`categorize`):
  optimizer, grad-norm/clip, casts, expert kernels, attention, other GEMMs, cross-entropy,
  communication, other. On a GPU the table counts kernel time; on a CPU, each op's own (self) CPU
  time.
- `PhaseTimer` (`moeflow bench train`): the forward, backward and optimizer time of each timed step,
  from CUDA events on a GPU (read once, at the end) or `perf_counter` on a CPU. The engines mark
  their phase boundaries with `phase(name)`, a no-op unless a timer is active (`timing_phases`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .gpu_idle import format_idle, idle_report

log = logging.getLogger("moeflow.train")

# ----------------------------------------------------------------------------- grouping (pure)
CATEGORIES = {  # key: label, in the order the table lists them
    "optimizer": "optimizer (fused AdamW / foreach)",
    "clip": "grad-norm / clip",
    "casts": "casts (to/copy fp32<->bf16)",
    "experts": "expert kernels (moeflow Triton / grouped_mm)",
    "attention": "attention (sdpa / flash)",
    "gemm": "other GEMMs",
    "cross_entropy": "cross-entropy / log_softmax",
    "communication": "communication",
    "other": "other",
}

# every Triton kernel moeflow launches (kernels/*.py; a unit test keeps this list complete)
MOEFLOW_KERNELS = (
    "_up_kernel",
    "_gmm_kernel",
    "_act_bwd_kernel",
    "_wgrad_kernel",
    "_gather_sum_kernel",
    "_gather_sum_bwd_kernel",
    "_segsum_kernel",
    "_fan_out_kernel",
    "_zero_pad_rows_kernel",
    "_aligned_layout_kernel",
    "_topk_rows_kernel",
)
CLIP_SCOPE = "moeflow/clip_grad_norm"  # the record_function around parallel/clip.py's clip_grad_norm_

_MOEFLOW = re.compile(r"(?<![A-Za-z0-9])(?:" + "|".join(MOEFLOW_KERNELS) + r")(?![A-Za-z0-9])")
# patterns over a normalised name: lower case, no underscores ("aten::_log_softmax" -> "aten::logsoftmax")
_COMMUNICATION = re.compile(
    r"nccl|allreduce|allgather|reducescatter|alltoall|c10d::|sendrecv|recordparamcomms|symmmem|gloo"
)
_EXPERTS = re.compile(r"groupedmm|groupproblemshape|groupedgemm|moeflow::experts|moeflow::topk")
_OPTIMIZER = re.compile(r"adam|^optimizer\.|multitensorapply.*adam")
_CLIP = re.compile(r"foreachnorm|lpnorm|clipgrad")
_ATTENTION = re.compile(r"flash|fmha|attention|sdpa|scaleddotproduct")
_CROSS_ENTROPY = re.compile(r"logsoftmax|nllloss|crossentropy")
_CASTS = re.compile(r"tocopy|copykernel|^aten::to$|^aten::copy$|bfloat16copy|convertelementtype|^aten::typeas$")
_GEMM = re.compile(
    r"gemm|matmul|nvjet|cutlass|cublas|xmma|wgmma|s16816|^aten::(?:mm|bmm|addmm|baddbmm|addbmm|linear|addmmactivation)$"
    r"|^tritontem.*mm|mmbackward"
)
# scopes (the enclosing ops and record_function ranges): what a generic kernel or op belongs to
_SCOPES = (
    ("optimizer", re.compile(r"^optimizer\.")),
    ("clip", re.compile(r"clipgrad")),
    ("experts", re.compile(r"^moeflow::(?:experts|topk)|groupedmm")),
    ("cross_entropy", re.compile(r"^aten::(?:crossentropyloss|nllloss|logsoftmax)")),
    ("attention", re.compile(r"scaleddotproduct|flash")),
)


def _norm(name: str) -> str:
    return name.lower().replace("_", "")


def categorize(name: str, scopes: Sequence[str] = ()) -> str:
    """The category (a key of CATEGORIES) of a kernel or op `name`, launched inside `scopes` (the
    names of the ops and record_function ranges around it, innermost first): communication by name,
    then the scope (a copy inside the optimizer's step is optimizer time, an index op inside the
    experts' custom op expert time), then the name."""
    n = _norm(name)
    if _COMMUNICATION.search(n):
        return "communication"
    for scope in scopes:
        s = _norm(scope)
        for key, pattern in _SCOPES:
            if pattern.search(s):
                return key
    if _MOEFLOW.search(name) or _EXPERTS.search(n):
        return "experts"
    for key, pattern in (
        ("optimizer", _OPTIMIZER),
        ("clip", _CLIP),
        ("attention", _ATTENTION),
        ("cross_entropy", _CROSS_ENTROPY),
        ("casts", _CASTS),
        ("gemm", _GEMM),
    ):
        if pattern.search(n):
            return key
    return "other"


@dataclass
class Group:
    key: str
    us: float = 0.0  # total microseconds over the profiled steps
    kernels: dict[str, list] = field(default_factory=dict)  # name -> [us, calls]

    @property
    def label(self) -> str:
        return CATEGORIES[self.key]

    def top(self, n: int) -> list[tuple[str, float, int]]:
        return sorted(((k, us, calls) for k, (us, calls) in self.kernels.items()), key=lambda r: -r[1])[:n]


def group_times(rows: Iterable[tuple[str, float, Sequence[str]]]) -> list[Group]:
    """(name, microseconds, scopes) rows -> one Group per category that has time, the longest first."""
    groups: dict[str, Group] = {}
    for name, us, scopes in rows:
        if us <= 0:
            continue
        g = groups.setdefault(categorize(name, scopes), Group(categorize(name, scopes)))
        g.us += us
        entry = g.kernels.setdefault(name, [0.0, 0])
        entry[0] += us
        entry[1] += 1
    return sorted(groups.values(), key=lambda g: -g.us)


def short(name: str, width: int = 70) -> str:
    """A kernel name a table can hold: C++ templates and argument lists cut."""
    name = re.sub(r"^void ", "", name)
    for opener, closer in (("<", ">"), ("(", ")")):
        out, depth = [], 0
        for ch in name:
            if ch == opener:
                if depth == 0:
                    out.append(opener + "..." + closer)
                depth += 1
            elif ch == closer and depth:
                depth -= 1
            elif depth == 0:
                out.append(ch)
        name = "".join(out)
    return name if len(name) <= width else name[: width - 3] + "..."


def format_table(groups: list[Group], steps: int, what: str, wall_ms: float | None = None, top: int = 2) -> str:
    """The per-step table the run logs: category, ms/step, share, and its top kernels."""
    total = sum(g.us for g in groups) or 1.0
    head = f"profile: {what} per step, over {steps} step{'s' if steps != 1 else ''}"
    if wall_ms is not None:
        head += f" (wall {wall_ms:.1f} ms/step)"
    lines = [head, f"{'category':<46} {'ms/step':>9} {'share':>6}  top"]
    for g in groups:
        tops = "; ".join(f"{short(k, 48)} {us / 1e3 / steps:.2f}" for k, us, _ in g.top(top))
        lines.append(f"{g.label:<46} {g.us / 1e3 / steps:9.2f} {100 * g.us / total:5.1f}%  {tops}")
    lines.append(f"{'total':<46} {total / 1e3 / steps:9.2f}")
    return "\n".join(lines)


def profile_window(start_step: int, steps: int, warmup: int = 3, active: int = 3) -> tuple[int, int] | None:
    """[first, end) step indices to profile: `active` steps after `warmup` steady ones (compiles and
    autotuning stay out), fewer of both in a short run; None when no step is left to run."""
    n = steps - start_step
    if n <= 0:
        return None
    w = min(warmup, n // 2)
    a = min(active, n - w)
    return start_step + w, start_step + w + a


# ----------------------------------------------------------------------------- torch.profiler
def profiler_rows(prof, device_type: str) -> list[tuple[str, float, list[str]]]:
    """(name, microseconds, scopes) of a finished profile: CUDA kernels (and copies) on a GPU, each op's
    self CPU time on a CPU. Scopes are the enclosing CPU ops, innermost first."""
    events = list(prof.events())

    def scopes(ev) -> list[str]:
        out, p = [], ev
        while p is not None:
            out.append(p.name)
            p = p.cpu_parent
        return out

    rows = []
    if device_type == "cuda":
        ops = {
            ev.id: ev for ev in events if ev.device_type.name == "CPU" and getattr(ev, "linked_correlation_id", 0) == 0
        }
        for ev in events:
            if ev.device_type.name != "CUDA" or getattr(ev, "is_user_annotation", False):
                continue  # a record_function range on the GPU timeline spans kernels counted on their own
            op = ops.get(getattr(ev, "linked_correlation_id", 0))
            rows.append((ev.name, ev.time_range.elapsed_us(), scopes(op) if op is not None else []))
        return rows
    for ev in events:
        if ev.device_type.name == "CPU" and not ev.is_async:
            rows.append((ev.name, ev.self_cpu_time_total, scopes(ev.cpu_parent) if ev.cpu_parent is not None else []))
    return rows


class StepProfiler:
    """torch.profiler over the steps of `profile_window`; on its last step, the trace and the table."""

    def __init__(
        self,
        run_dir: Path,
        device: torch.device,
        window: tuple[int, int],
        rank: int = 0,
        world: int = 1,
        is_main: bool = True,
    ):
        self.dir, self.device, self.window = Path(run_dir) / "profile", device, window
        self.rank, self.world, self.is_main = rank, world, is_main
        self.prof, self.t0 = None, 0.0

    def begin(self, step: int) -> None:
        if self.prof is None and step == self.window[0]:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=activities)
            _sync(self.device)
            self.prof.start()
            self.t0 = time.perf_counter()

    def end(self, done: int, result: dict) -> None:
        if self.prof is None or done != self.window[1]:
            return
        _sync(self.device)
        wall_ms = (time.perf_counter() - self.t0) * 1e3
        prof, self.prof = self.prof, None
        prof.stop()
        steps = self.window[1] - self.window[0]
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self.dir / (f"trace_rank{self.rank}.json" if self.world > 1 else "trace.json")
        prof.export_chrome_trace(str(trace))
        groups = group_times(profiler_rows(prof, self.device.type))
        what = "CUDA kernel time" if self.device.type == "cuda" else "CPU self time"
        idle = idle_report(trace, steps) if self.device.type == "cuda" else {}  # kernel time misses a GPU left waiting
        table = format_table(groups, steps, what, wall_ms / steps)
        if idle:
            table += "\n" + format_idle(idle)
        result["profile"] = {
            "trace": str(trace),
            "steps": list(range(self.window[0] + 1, self.window[1] + 1)),  # as the log counts them
            "wall_ms_per_step": wall_ms / steps,
            "ms_per_step": {g.key: g.us / 1e3 / steps for g in groups},
            **({"gpu_idle": idle} if idle else {}),
        }
        if self.is_main:
            (self.dir / "summary.txt").write_text(table + "\n")
            (self.dir / "summary.json").write_text(
                json.dumps(
                    {
                        **result["profile"],
                        "measured": what,
                        "top": {
                            g.key: [[k, us / 1e3 / steps, calls // steps] for k, us, calls in g.top(10)] for g in groups
                        },
                    },
                    indent=1,
                )
                + "\n"
            )
            log.info("%s\ntrace: %s (chrome://tracing or ui.perfetto.dev)", table, trace)


# ----------------------------------------------------------------------------- phase times
class PhaseTimer:
    """Forward, backward and optimizer time of every step from `first_step` on (`moeflow bench train`).

    `begin(step)` opens a step, `mark(name)` ends the phase `name` (the time since the last mark goes to
    it; repeated names add up, as over micro-batches), `end()` closes the step. On CUDA each mark
    records an event (no host sync; `means()` reads them all once); elsewhere it reads perf_counter.
    """

    def __init__(self, device: torch.device, first_step: int = 0):
        self.device, self.first_step = device, first_step
        self.cuda = device.type == "cuda"
        self.steps: list[list] = []  # per step: [(name, event or time)], the first entry the start
        self.current: list | None = None

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def begin(self, step: int) -> None:
        self.current = [("", self._now())] if step >= self.first_step else None

    def mark(self, name: str) -> None:
        if self.current is not None:
            self.current.append((name, self._now()))

    def end(self) -> None:
        if self.current is not None and len(self.current) > 1:
            self.steps.append(self.current)
        self.current = None

    def means(self) -> dict[str, float]:
        """Seconds per step of each phase, averaged over the timed steps ({} if none was timed)."""
        if not self.steps:
            return {}
        if self.cuda:
            torch.cuda.synchronize(self.device)
        totals: dict[str, float] = {}
        for marks in self.steps:
            for (_, a), (name, b) in zip(marks, marks[1:]):
                totals[name] = totals.get(name, 0.0) + (a.elapsed_time(b) / 1e3 if self.cuda else b - a)
        return {k: v / len(self.steps) for k, v in totals.items()}

    @property
    def measured_with(self) -> str:
        return "CUDA events" if self.cuda else "perf_counter"


_timer: PhaseTimer | None = None


@contextlib.contextmanager
def timing_phases(timer: PhaseTimer):
    """Within this block, training steps (`launch/train.py`) report their phases to `timer`."""
    global _timer
    previous, _timer = _timer, timer
    try:
        yield timer
    finally:
        _timer = previous


def phase(name: str) -> None:
    """End the phase `name` of the step being timed (an engine's forward, backward); a no-op unless
    `moeflow bench train` times phases."""
    if _timer is not None:
        _timer.mark(name)


class StepProbe:
    """What the training loop calls around each step: the profiler of trainer.profile=true, the phase timer
    of `moeflow bench train`; nothing at all in a normal run."""

    def __init__(
        self,
        trainer_cfg,
        run_dir: Path,
        device: torch.device,
        start_step: int,
        rank: int = 0,
        world: int = 1,
        is_main: bool = True,
    ):
        window = profile_window(start_step, trainer_cfg.steps) if getattr(trainer_cfg, "profile", False) else None
        self.profiler = StepProfiler(run_dir, device, window, rank, world, is_main) if window else None

    def begin(self, step: int) -> None:
        if self.profiler is not None:
            self.profiler.begin(step)
        if _timer is not None:
            _timer.begin(step)

    def end(self, done: int, result: dict) -> None:
        """After the optimizer step of step `done - 1`."""
        if _timer is not None:
            _timer.mark("optimizer")
            _timer.end()
        if self.profiler is not None:
            self.profiler.end(done, result)

    def close(self) -> None:
        """A run that stops inside the window (preempted, failed) leaves no profiler running."""
        if self.profiler is not None and self.profiler.prof is not None:
            self.profiler.prof.stop()
            self.profiler.prof = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
