"""trainer.profile=true and the phase timer (launch/profiling.py): the kernel grouping on fake names,
the profiled steps, and a tiny CPU run that writes its trace and table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from moeflow.launch import profiling
from moeflow.launch.profiling import categorize, format_table, group_times, profile_window

# kernel and op names as torch.profiler reports them (H100 kernels from the profile, CPU ops)
NAMED = {
    "optimizer": [
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::TensorListMetadata<5>, "
        "at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 5, (at::native::ADAM_MODE)1, false>, float*>(...)",
        "aten::_fused_adamw_",
        "Optimizer.step#AdamW.step",
    ],
    "clip": [
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...LpNormFunctor<float, 2>...>",
        "aten::_foreach_norm",
        "void at::native::lpnorm_cleanup<float, 2, float, float>(...)",
    ],
    "casts": [
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}>",
        "aten::_to_copy",
        "aten::copy_",
        "triton_poi_fused__to_copy_3",
        "ToCopyBackward0",
    ],
    "experts": [
        "_gmm_kernel",
        "_up_kernel",
        "_wgrad_kernel",
        "_act_bwd_kernel",
        "_fan_out_kernel",
        "moeflow::experts_fwd",
        "void cutlass::device_kernel<at::cuda::detail::enable_3x_kernel_for_sm9x<cutlass::gemm::kernel::GemmUniversal<"
        "cutlass::gemm::GroupProblemShape<cute::tuple<int, int, int> >, ...> > >",
        "aten::_grouped_mm",
    ],
    "attention": [
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t> >",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "cudnn_generated_fmha_sm90_bf16",
        "ScaledDotProductFlashAttentionBackward0",
    ],
    "gemm": [
        "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64",
        "aten::mm",
        "aten::addmm",
        "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_32x5_tn",
    ],
    "cross_entropy": [
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForwardEpilogue>(...)",
        "aten::_log_softmax_backward_data",
        "aten::nll_loss_forward",
        "NllLossBackward0",
        "triton_red_fused__log_softmax_2",
    ],
    "communication": [
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
        "c10d::allreduce_",
        "moeflow::all_to_all",
        "ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL",
    ],
    "other": [
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, ...>",
        "aten::mul",
        "Memset (Device)",
        "aten::empty",
        "autograd::engine::evaluate_function: MulBackward0",
    ],
}


@pytest.mark.parametrize("category", list(NAMED))
def test_kernel_and_op_names_fall_in_their_category(category):
    for name in NAMED[category]:
        assert categorize(name) == category, name


def test_the_scope_decides_for_generic_kernels_but_communication_stays_communication():
    copy = "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(...)>"
    mul = "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...BinaryOpScalarTensorFunctor<float, 1, 1, 0>...>"
    assert (
        categorize(copy, ["aten::copy_", "aten::_foreach_copy_", "Optimizer.step#AdamW.step"]) == "optimizer"
    )  # the bf16 copy the step writes
    assert categorize(mul, ["aten::_foreach_mul_", profiling.CLIP_SCOPE]) == "clip"
    assert categorize("aten::index_select", ["moeflow::experts_bwd"]) == "experts"
    assert (
        categorize("aten::fill_", ["aten::nll_loss_forward", "aten::nll_loss_nd", "aten::cross_entropy_loss"])
        == "cross_entropy"
    )
    assert categorize("ncclDevKernel_AllGather_RING_LL", ["Optimizer.step#AdamW.step"]) == "communication"
    assert categorize(mul) == "other"  # a multi-tensor multiply outside any scope


# kernels/ files whose kernels are not the experts': each one's category by name
NOT_EXPERTS = {"adamw.py": "optimizer", "cross_entropy.py": "cross_entropy"}


def test_every_moeflow_triton_kernel_is_in_its_category():
    """MOEFLOW_KERNELS lists every @triton.jit *_kernel of the expert path in kernels/ (a new kernel must
    be added there); the optimizer's and the cross-entropy's fall in their own categories by name."""
    root = Path(profiling.__file__).resolve().parents[1] / "kernels"
    found, others = set(), {}
    for path in root.glob("*.py"):
        names = set(re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", path.read_text()))
        if path.name in NOT_EXPERTS:
            others.update({n: NOT_EXPERTS[path.name] for n in names})
        else:
            found |= names
    assert found and found <= set(profiling.MOEFLOW_KERNELS), found - set(profiling.MOEFLOW_KERNELS)
    assert all(categorize(k) == "experts" for k in found)
    assert others and all(categorize(k) == want for k, want in others.items()), {k: categorize(k) for k in others}


def test_grouping_sums_per_category_and_ranks_kernels():
    rows = [
        ("_gmm_kernel", 300.0, []),
        ("_gmm_kernel", 100.0, []),
        ("_up_kernel", 150.0, []),
        ("aten::mm", 50.0, []),
        ("FusedAdamMathFunctor", 400.0, []),
        ("aten::mul", 0.0, []),
    ]
    groups = group_times(rows)
    assert [g.key for g in groups] == ["experts", "optimizer", "gemm"]  # longest first; zero-time rows dropped
    experts = groups[0]
    assert experts.us == 550.0 and experts.top(1) == [("_gmm_kernel", 400.0, 2)]
    table = format_table(groups, steps=1, what="CUDA kernel time", wall_ms=1.2)
    assert "expert kernels" in table and "optimizer (fused AdamW" in table and "other GEMMs" in table
    assert re.search(
        r"expert kernels.*\s0\.55\s+55\.0%  _gmm_kernel 0\.40; _up_kernel 0\.15$", table, re.M
    )  # 550 of 1000 us
    assert table.splitlines()[-1].split()[-1] == "1.00"


def test_long_template_names_are_shortened_for_the_table():
    assert profiling.short("void at::native::foo<float, 4>(at::Tensor, int)") == "at::native::foo<...>(...)"
    assert len(profiling.short("x" * 200, 40)) == 40


@pytest.mark.parametrize(
    "start,steps,window",
    [
        (0, 100, (3, 6)),
        (0, 6, (3, 6)),
        (0, 4, (2, 4)),
        (0, 2, (1, 2)),
        (0, 1, (0, 1)),
        (10, 12, (11, 12)),
        (5, 5, None),
    ],
)
def test_profiled_steps_follow_warmup_and_fit_short_runs(start, steps, window):
    assert profile_window(start, steps) == window


def test_phase_timer_adds_repeated_phases_and_skips_warmup_steps():
    timer = profiling.PhaseTimer(torch.device("cpu"), first_step=1)
    with profiling.timing_phases(timer):
        for step in range(3):
            timer.begin(step)
            for _ in range(2):  # two micro-batches
                profiling.phase("forward")
                profiling.phase("backward")
            profiling.phase("optimizer")
            timer.end()
    profiling.phase("forward")  # outside the block: no timer, no effect
    assert len(timer.steps) == 2 and all(len(marks) == 6 for marks in timer.steps)
    means = timer.means()
    assert set(means) == {"forward", "backward", "optimizer"} and all(v >= 0 for v in means.values())
    assert profiling._timer is None


@pytest.mark.slow  # trains 4 tiny steps (about 2 s on 2 cores)
def test_a_profiled_run_writes_a_trace_and_a_table_by_category(tmp_path, caplog):
    from helpers.config import TINY, compose_cfg
    from moeflow.launch.train import train

    cfg = compose_cfg(*TINY, "trainer.steps=4", "trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.profile=true")
    with caplog.at_level("INFO", logger="moeflow.train"):
        result = train(cfg, tmp_path)
    trace = tmp_path / "profile" / "trace.json"
    assert trace.is_file() and json.loads(trace.read_text())["traceEvents"]
    assert result["profile"]["steps"] == [3, 4] and result["step"] == 4
    ms = result["profile"]["ms_per_step"]
    assert {"optimizer", "clip", "gemm", "attention", "cross_entropy"} <= set(ms) and all(v > 0 for v in ms.values())
    table = (tmp_path / "profile" / "summary.txt").read_text()
    for label in (
        "optimizer (fused AdamW / foreach)",
        "grad-norm / clip",
        "other GEMMs",
        "attention (sdpa / flash)",
        "cross-entropy / log_softmax",
    ):
        assert label in table and label in caplog.text
    summary = json.loads((tmp_path / "profile" / "summary.json").read_text())
    assert summary["measured"] == "CPU self time" and summary["top"]["gemm"][0][0] == "aten::mm"
    assert not torch.autograd.profiler._is_profiler_enabled  # stopped after its window


def test_profile_is_off_by_default_and_checked_as_a_bool():
    from helpers.config import compose_cfg
    from moeflow.launch import schema
    from moeflow.moe.errors import ConfigError

    assert compose_cfg().trainer.profile is False
    with pytest.raises(ConfigError, match="trainer.profile='yes' is not valid: it takes true or false"):
        schema.check(compose_cfg("trainer.profile=yes"))


def test_cuda_kernels_are_timed_on_the_device_and_scoped_by_the_op_that_launched_them():
    """profiler_rows on a GPU (fake events shaped as torch.profiler's): kernels only, their launching op's scopes."""
    from types import SimpleNamespace as NS

    cpu, cuda = NS(name="CPU"), NS(name="CUDA")
    step = NS(
        name="Optimizer.step#AdamW.step",
        device_type=cpu,
        id=1,
        linked_correlation_id=0,
        cpu_parent=None,
        is_async=False,
    )
    foreach = NS(
        name="aten::_foreach_copy_", device_type=cpu, id=2, linked_correlation_id=0, cpu_parent=step, is_async=False
    )
    launch = NS(
        name="cudaLaunchKernel", device_type=cpu, id=9, linked_correlation_id=2, cpu_parent=None, is_async=False
    )
    kernel = NS(
        name="direct_copy_kernel_cuda",
        device_type=cuda,
        id=9,
        linked_correlation_id=2,
        cpu_parent=None,
        time_range=NS(elapsed_us=lambda: 40.0),
    )
    stray = NS(
        name="_topk_rows_kernel",
        device_type=cuda,
        id=10,
        linked_correlation_id=77,
        cpu_parent=None,
        time_range=NS(elapsed_us=lambda: 5.0),
    )
    # the GPU-side span of a record_function range (Optimizer.step#AdamW.step): counted once, through its kernels
    span = NS(
        name="Optimizer.step#AdamW.step",
        device_type=cuda,
        id=11,
        linked_correlation_id=1,
        cpu_parent=None,
        is_user_annotation=True,
        time_range=NS(elapsed_us=lambda: 45.0),
    )
    prof = NS(events=lambda: [step, foreach, launch, kernel, stray, span])
    rows = profiling.profiler_rows(prof, "cuda")
    assert rows == [
        ("direct_copy_kernel_cuda", 40.0, ["aten::_foreach_copy_", "Optimizer.step#AdamW.step"]),
        ("_topk_rows_kernel", 5.0, []),
    ]
    assert [g.key for g in group_times(rows)] == [
        "optimizer",
        "experts",
    ]  # the copy the optimizer's step writes is its time
