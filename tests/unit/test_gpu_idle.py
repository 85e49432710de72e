"""launch/gpu_idle.py: the GPU's idle time in a profiled window, and what the host ran meanwhile, from a
chrome trace laid out by hand (the times are known, so the figures are too)."""

from __future__ import annotations

import json

import pytest

from moeflow.launch.gpu_idle import NO_HOST_OP, format_idle, idle_report


def _x(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def _trace():
    # two steps of 1000 us on the GPU's clock; kernels on two streams overlap, so busy time is their union
    ev = [
        _x("kernel", "gemm", 0, 300),
        _x("kernel", "overlapping", 250, 100),  # busy to 350
        _x("gpu_memcpy", "Memcpy DtoH", 350, 10),  # back to back: no gap
        # gap 360..760 (400 us): the host waits in a sync inside aten::item
        _x("kernel", "adamw", 760, 240),
        # gap 1000..1010 (10 us): launch latency, counted as idle but not named
        _x("kernel", "gemm", 1010, 490),
        # gap 1500..1600 (100 us): no host op at its midpoint
        _x("gpu_memset", "Memset", 1600, 400),
        # host side
        _x("cpu_op", "aten::item", 340, 430),
        _x("cpu_op", "aten::_local_scalar_dense", 345, 420),
        _x("cuda_runtime", "cudaStreamSynchronize", 355, 400),
        _x("user_annotation", "Optimizer.step#AdamW.step", 800, 150),  # not during a gap
        _x("gpu_user_annotation", "Optimizer.step#AdamW.step", 760, 240),  # the GPU-side copy: not device work
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 1700},  # not a span
    ]
    return {"traceEvents": ev}


def test_idle_time_is_the_gaps_in_the_union_of_device_work():
    r = idle_report(_trace(), steps=2)
    assert r["window_ms_per_step"] == pytest.approx(2000 / 1e3 / 2)
    assert r["idle_ms_per_step"] == pytest.approx((400 + 10 + 100) / 1e3 / 2)
    assert r["idle_share"] == pytest.approx(510 / 2000)
    assert r["causes_ms_per_step"] == pytest.approx({"aten::item > cudaStreamSynchronize": 0.2, NO_HOST_OP: 0.05})
    assert list(r["causes_ms_per_step"]) == ["aten::item > cudaStreamSynchronize", NO_HOST_OP]  # largest first


def test_the_report_reads_a_trace_file_and_formats_one_line(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(_trace()))
    line = format_idle(idle_report(path, steps=2))
    assert "\n" not in line
    assert line.startswith(
        "GPU idle 0.26 ms/step (25.5% of 1.0 ms), while the host ran: aten::item > cudaStreamSynchronize 0.20"
    )


def test_a_trace_without_device_work_gives_nothing():
    assert idle_report({"traceEvents": [_x("cpu_op", "aten::mm", 0, 10)]}, steps=1) == {}
    assert format_idle({}) == ""


def test_each_gap_is_named_from_one_thread_the_one_still_issuing_work():
    def on(tid, cat, name, ts, dur):
        return {**_x(cat, name, ts, dur), "pid": 1, "tid": tid}

    ev = [
        _x("kernel", "a", 0, 100),
        _x("kernel", "b", 500, 100),  # gap 100..500, midpoint 300
        _x("kernel", "c", 900, 100),  # gap 600..900, midpoint 750
        on(7, "cpu_op", "aten::copy_", 0, 1000),  # another thread, busy the whole time
        on(1, "cpu_op", "aten::item", 250, 100),
        on(1, "cuda_runtime", "cudaStreamSynchronize", 260, 80),
        on(
            1, "cuda_driver", "cuLaunchKernelEx", 740, 20
        ),  # a launch-bound gap: Triton/Inductor launch through the driver
    ]
    causes = idle_report({"traceEvents": ev}, steps=1)["causes_ms_per_step"]
    assert causes == pytest.approx({"aten::item > cudaStreamSynchronize": 0.4, "cuLaunchKernelEx": 0.3})
