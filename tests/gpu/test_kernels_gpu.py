"""Triton expert kernels on a real GPU (bf16, compiled, autotuned): run through the device tool."""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton", reason="needs Triton: pip install -e '.[triton]'")

from moeflow.kernels import autotune, gemm, ops  # noqa: E402
from moeflow.moe.experts import IMPLEMENTATIONS, GroupedExperts, expert_mlp  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def routed_case(T, D, F, E, k, skew_expert=None):
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(T, E, device="cuda")
    if skew_expert is not None:
        logits[: T // 2, skew_expert] += 10
    val, idx = logits.softmax(-1).topk(k, -1)
    expert_A = idx.reshape(-1)
    order = torch.argsort(expert_A, stable=True)
    token_A = torch.arange(T, device="cuda").repeat_interleave(k)[order]
    weight_A = val.reshape(-1)[order].clone().requires_grad_()
    counts_E = torch.bincount(expert_A, minlength=E)
    ws = [
        (torch.randn(*s, device="cuda") * s[1] ** -0.5).bfloat16().requires_grad_()
        for s in ((E, D, F), (E, D, F), (E, F, D))
    ]
    return x, ws, token_A, weight_A, counts_E


def check_routed(shape, gather_rows=False):
    T, D, F, E, k, skew = shape
    x, (w1, w3, w2), token_A, weight_A, counts_E = routed_case(T, D, F, E, k, skew)
    dy = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    y = ops.expert_mlp_routed(x, w1, w3, w2, counts_E, token_A, weight_A, gather_rows=gather_rows)
    leaves = [x, w1, w3, w2, weight_A]
    grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    xr, w1r, w3r, w2r, wr = ref_leaves
    outs = [expert_mlp(r, w1r[e], w3r[e], w2r[e]) for e, r in enumerate(torch.split(xr[token_A], counts_E.tolist()))]
    yr = torch.zeros_like(xr).index_add(0, token_A, torch.cat(outs) * wr[:, None])
    refs = torch.autograd.grad(yr, ref_leaves, dy.double())
    assert rel(y, yr) < 1e-2
    for name, g, r in zip(["x", "w1", "w3", "w2", "weight"], grads, refs):
        assert rel(g, r) < 2e-2, (name, rel(g, r))
    # bit-deterministic
    y2 = ops.expert_mlp_routed(x, w1, w3, w2, counts_E, token_A, weight_A, gather_rows=gather_rows)
    assert torch.equal(y, y2) and all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(y2, leaves, dy)))


@pytest.mark.parametrize("shape", [(512, 256, 384, 8, 2, None), (1000, 512, 1408, 16, 6, 3), (300, 128, 200, 64, 8, 0)])
def test_routed_bf16_matches_float64(shape):
    check_routed(shape)


def test_rows_gathered_inside_the_gemms_match_float64():
    check_routed((1000, 512, 1408, 16, 6, 3), gather_rows=True)


@pytest.fixture
def restore_autotune_lists():
    from moeflow.kernels import gemm

    saved = {k: k.configs for k in (gemm._up_kernel, gemm._gmm_kernel, gemm._wgrad_kernel)}
    yield
    for kern, configs in saved.items():
        kern.configs = configs
        kern.cache.clear()


def _persistent(shape):
    return len(shape) > 5 and shape[5]


def test_every_autotune_candidate_is_correct(restore_autotune_lists):
    """Each tile candidate forced in turn (tests may run with MOEFLOW_AUTOTUNE=0, which tunes nothing).
    Persistent candidates also run a problem with more tiles than the GPU has SMs, so each
    program walks several tiles through one flattened pipeline."""
    autotune.force_tiles(gemm._wgrad_kernel, autotune.WGRAD_SHAPES[0])
    for i in range(max(len(autotune.UP_SHAPES), len(autotune.GMM_SHAPES))):
        up_shape, gmm_shape = (
            autotune.UP_SHAPES[i % len(autotune.UP_SHAPES)],
            autotune.GMM_SHAPES[i % len(autotune.GMM_SHAPES)],
        )
        autotune.force_tiles(gemm._up_kernel, up_shape)
        autotune.force_tiles(gemm._gmm_kernel, gmm_shape)
        check_routed((700, 256, 320, 8, 2, 1), gather_rows=i % 2 == 1)
        if _persistent(up_shape) or _persistent(gmm_shape):
            check_routed((4096, 512, 640, 16, 2, 3), gather_rows=i % 2 == 0)
    # weight gradients: one and two B operands, contiguous (TMA) and row-gathered reads; a persistent
    # candidate on 64 experts (more output tiles than SMs)
    M, N = 256, 320
    for shape in autotune.WGRAD_SHAPES:
        E = 64 if _persistent(shape) else 4
        counts = torch.tensor([0, 1, 500, 399], device="cuda") if E == 4 else torch.randint(0, 120, (E,), device="cuda")
        counts[1] = 1
        counts = counts.to(torch.int32)
        R = int(counts.sum())
        a = torch.randn(R, M, device="cuda", dtype=torch.bfloat16)
        b1, b2 = (torch.randn(R, N, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        perm = torch.randperm(R, device="cuda").to(torch.int32)
        rows = torch.split(torch.arange(R, device="cuda"), counts.tolist())

        def reference(b):  # float64, per expert: a[rows of e]^T @ b[rows of e]
            return torch.stack([a[r].double().T @ b[r].double() for r in rows])

        for two, gather in ((False, None), (True, None), (False, perm)):
            if not autotune.fits_one(*shape[:3], shape[4], two):  # the autotuner never runs it here
                continue
            autotune.force_tiles(gemm._wgrad_kernel, shape)
            o1, o2 = gemm.wgrad(a, None, b1, b2 if two else None, gather, None, counts)
            bs = [b1[gather.long()] if gather is not None else b1] + ([b2] if two else [])
            for o, b in zip([o1, o2], bs):
                assert rel(o, reference(b)) < 1e-2, (shape, two, gather is not None)
        # the aligned layout: groups padded with zero rows to a multiple of ROW_ALIGN, both operands through TMA
        counts_P = (counts + autotune.ROW_ALIGN - 1) // autotune.ROW_ALIGN * autotune.ROW_ALIGN
        real = torch.cat([torch.arange(p, device="cuda") < c for p, c in zip(counts_P.tolist(), counts.tolist())])
        padded = []
        for t in (a, b1, b2):
            tp = t.new_zeros(int(counts_P.sum()), t.shape[1])
            tp[real] = t
            padded.append(tp)
        for two in (False, True):
            if not autotune.fits_one(*shape[:3], shape[4], two):
                continue
            autotune.force_tiles(gemm._wgrad_kernel, shape)
            o1, o2 = gemm.wgrad(
                padded[0], None, padded[1], padded[2] if two else None, None, None, counts_P, aligned=True
            )
            for o, b in zip([o1, o2], [b1, b2] if two else [b1]):
                assert rel(o, reference(b)) < 1e-2, (shape, two, "aligned")


def test_impls_agree_and_compile_traces():
    assert "triton" in IMPLEMENTATIONS and "grouped_mm" in IMPLEMENTATIONS
    from moeflow.launch.config import resolve_experts_impl

    assert resolve_experts_impl("auto", torch.device("cuda")) == "triton"
    ex = GroupedExperts(8, 256, 512).cuda()
    x = torch.randn(1000, 256, device="cuda")
    counts = torch.tensor([0, 1, 300, 99, 200, 100, 150, 150], device="cuda")
    outs = {}
    for impl in ("torch", "triton", "grouped_mm"):
        ex.impl = impl
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs[impl] = ex(x, counts)
    for impl in ("triton", "grouped_mm"):
        assert rel(outs[impl], outs["torch"]) < 1e-2, impl
    ex.impl = "triton"
    compiled = torch.compile(lambda x, c: ex(x, c), fullgraph=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        yc = compiled(x, counts)
        yc.float().sum().backward()
    assert rel(yc, outs["torch"]) < 1e-2 and torch.isfinite(ex.w1_EDF.grad).all()


_TUNE_ONCE = """
import json, sys, time, torch
from moeflow.kernels import gemm, ops
T, D, F, E, k = 2048, 512, 1024, 16, 4
torch.manual_seed(0)
x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
val, idx = torch.randn(T, E, device="cuda").softmax(-1).topk(k, -1)
order = torch.argsort(idx.reshape(-1), stable=True)
token_A = torch.arange(T, device="cuda").repeat_interleave(k)[order]
weight_A = val.reshape(-1)[order].clone().requires_grad_()
counts_E = torch.bincount(idx.reshape(-1), minlength=E)
ws = [(torch.randn(*s, device="cuda") * s[1] ** -0.5).bfloat16().requires_grad_() for s in ((E, D, F), (E, D, F), (E, F, D))]
t = time.perf_counter()
y = ops.expert_mlp_routed(x, *ws, counts_E, token_A, weight_A)
torch.autograd.grad(y, [x, *ws, weight_A], torch.randn_like(y))
torch.cuda.synchronize()
kernels = (gemm._up_kernel, gemm._gmm_kernel, gemm._wgrad_kernel)
print(json.dumps({"seconds": time.perf_counter() - t, "benchmarked": [hasattr(k, "bench_time") for k in kernels],
                  "picks": [len(k.cache) for k in kernels]}))
"""


def test_a_second_process_reuses_the_tuned_tiles(tmp_path):
    """Autotuning runs once per GPU kind and shape: the next process reads every pick from disk."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path), "MOEFLOW_AUTOTUNE": "1", "MOEFLOW_AUTOTUNE_CACHE": "1"}
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", _TUNE_ONCE], env=env, check=True, capture_output=True, text=True
            ).stdout.splitlines()[-1]
        )
        for _ in range(2)
    ]
    assert any(runs[0]["benchmarked"]) and not any(runs[1]["benchmarked"]), runs
    assert runs[1]["picks"] == runs[0]["picks"] and len(list(tmp_path.rglob("moeflow-*.autotune.json"))) == sum(
        runs[0]["picks"]
    )
    print(f"first call: {runs[0]['seconds']:.1f} s tuning, {runs[1]['seconds']:.1f} s from the disk cache")


def test_master_weight_adamw_kernel_matches_the_reference_on_the_gpu():
    """kernels/adamw.py on CUDA (odd size: a masked tail) against its torch-ops reference, 3 steps."""
    from moeflow.kernels.adamw import adamw_master_step, adamw_reference

    torch.manual_seed(0)
    n = 3 * 1024 * 1024 + 17
    w0 = torch.randn(n, device="cuda")
    a = {
        "master": w0.clone(),
        "param": w0.bfloat16(),
        "m": torch.zeros(n, device="cuda"),
        "v": torch.zeros(n, device="cuda"),
    }
    b = {k: v.clone() for k, v in a.items()}
    for step in range(1, 4):
        grad = torch.randn(n, device="cuda").bfloat16()
        scale = torch.tensor(0.7, device="cuda")
        adamw_master_step(a["master"], a["param"], grad, a["m"], a["v"], scale, step, 1e-3, 0.9, 0.95, 1e-8, 0.1)
        adamw_reference(b["master"], b["param"], grad, b["m"], b["v"], scale, step, 1e-3, 0.9, 0.95, 1e-8, 0.1)
    torch.testing.assert_close(a["master"], b["master"], rtol=1e-6, atol=1e-7)
    assert (
        a["param"] != b["param"]
    ).float().mean().item() < 1e-4  # the same rounding but where the masters differ by an ulp
    assert torch.equal(a["param"], a["master"].bfloat16())  # round to nearest even, as autocast's cast


def test_the_kernel_on_master_halves_is_the_fp32_master_kernel_to_the_bit_on_the_gpu():
    """optim.master_remainders on CUDA (odd size, fp32 and bf16 moments, 3 steps): the joined halves,
    the moments and the high half equal the fp32-master kernel's results, bit for bit."""
    from moeflow.kernels.adamw import adamw_master_step, join_master, split_master

    torch.manual_seed(0)
    n = 3 * 1024 * 1024 + 17
    w0 = torch.randn(n, device="cuda")
    for moments in (torch.float32, torch.bfloat16):
        zeros = torch.zeros(n, device="cuda", dtype=moments)
        full = {"master": w0.clone(), "param": w0.bfloat16(), "m": zeros.clone(), "v": zeros.clone()}
        high, low = split_master(w0)
        halves = {"master": low, "param": high, "m": zeros.clone(), "v": zeros.clone()}
        for step in range(1, 4):
            grad = torch.randn(n, device="cuda").bfloat16()
            scale = torch.tensor(0.7, device="cuda")
            for s in (full, halves):
                adamw_master_step(
                    s["master"], s["param"], grad, s["m"], s["v"], scale, step, 1e-3, 0.9, 0.95, 1e-8, 0.1, seed=step
                )
        joined = join_master(halves["param"], halves["master"])
        assert torch.equal(joined.view(torch.int32), full["master"].view(torch.int32)), moments
        assert torch.equal(halves["m"], full["m"]) and torch.equal(halves["v"], full["v"]), moments
        assert torch.equal(halves["param"], split_master(full["master"])[0]), moments
        assert (halves["param"] != full["param"]).float().mean().item() < 2e-5  # RNE but at ties


def test_master_halves_join_in_host_memory_and_split_back_onto_the_gpu():
    """MasterWeightAdamW(remainders=True) on CUDA: inside masters_in_model the fp32 weights sit in host
    memory (no GPU copy), and a change made there comes back as the GPU's bf16 weight and low half."""
    from moeflow.kernels.adamw import join_master, split_master
    from moeflow.launch.optim import MasterWeightAdamW

    torch.manual_seed(0)
    model = torch.nn.Linear(256, 512, bias=False).cuda()
    opt = MasterWeightAdamW([{"params": [model.weight]}], [model.weight], lr=1e-3, remainders=True)
    assert model.weight.dtype == torch.bfloat16 and model.weight.is_cuda
    target = torch.randn(512, 256)
    before = torch.cuda.memory_allocated()
    with opt.masters_in_model():
        assert model.weight.device.type == "cpu" and model.weight.dtype == torch.float32
        assert torch.cuda.memory_allocated() <= before
        model.weight.copy_(target)
    assert model.weight.is_cuda and model.weight.dtype == torch.bfloat16
    low = opt.state[model.weight]["master_low"]
    assert low.is_cuda and torch.equal(join_master(model.weight.cpu(), low.cpu()), target)
    assert torch.equal(model.weight.cpu(), split_master(target)[0])


def test_bf16_moments_on_the_gpu_round_stochastically_around_the_fp32_update():
    """kernels/adamw.py with bf16 moments on CUDA (odd size): the fp32 weight is the fp32 update's, each
    moment one of the two bf16 values around the fp32 moment, the second moment decays on average where
    rounding to nearest would freeze it (beta2=0.999), and the same seed draws the same."""
    from moeflow.kernels.adamw import adamw_master_step, adamw_reference

    torch.manual_seed(0)
    n = 3 * 1024 * 1024 + 17
    w0 = torch.randn(n, device="cuda")
    m0, v0 = (torch.randn(n, device="cuda") * 0.1).bfloat16(), torch.ones(n, device="cuda").bfloat16()
    grad = (torch.randn(n, device="cuda") * 1e-3).bfloat16()
    scale = torch.tensor(1.0, device="cuda")
    ref = {"master": w0.clone(), "param": w0.bfloat16(), "m": m0.float(), "v": v0.float()}
    adamw_reference(ref["master"], ref["param"], grad, ref["m"], ref["v"], scale, 4, 1e-3, 0.9, 0.999, 1e-8, 0.1)
    outs = []
    for seed in (7, 7, 8):
        master, param, m, v = w0.clone(), w0.bfloat16(), m0.clone(), v0.clone()
        adamw_master_step(master, param, grad, m, v, scale, 4, 1e-3, 0.9, 0.999, 1e-8, 0.1, seed=seed)
        outs.append((m, v))
    torch.testing.assert_close(master, ref["master"], rtol=1e-6, atol=1e-7)
    assert torch.equal(param, master.bfloat16())
    for got, want in zip(outs[0], (ref["m"], ref["v"])):
        below = got.float() <= want
        other = torch.where(
            below, torch.nextafter(got, torch.full_like(got, 9.0)), torch.nextafter(got, -torch.full_like(got, 9.0))
        )
        assert bool(((got.float() == want) | ((other.float() - want) * (got.float() - want) <= 0)).all())
    assert abs(outs[0][1].float().mean().item() - ref["v"].mean().item()) < 1e-5  # RNE: every v stays 1.0
    assert torch.equal(outs[0][0], outs[1][0]) and not torch.equal(outs[0][0], outs[2][0])


def test_fused_cross_entropy_matches_float64_at_a_real_vocabulary():
    """kernels/cross_entropy.py on CUDA, bf16 logits of OLMoE's 50,304 classes, against float64."""
    import torch.nn.functional as F

    from moeflow.kernels.cross_entropy import cross_entropy_per_token
    from moeflow.launch.losses import lm_loss

    torch.manual_seed(0)
    logits = (torch.randn(2, 96, 50304, device="cuda") * 4).bfloat16().requires_grad_()
    target = torch.randint(0, 50304, (2, 96), device="cuda")
    loss = lm_loss(logits, target)
    loss.backward()
    ref_logits = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(ref_logits.flatten(0, 1), target.flatten())
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-2, atol=1e-6)
    per_token = cross_entropy_per_token(logits.detach().flatten(0, 1), target.flatten())
    torch.testing.assert_close(
        per_token.double(),
        F.cross_entropy(ref_logits.detach().flatten(0, 1), target.flatten(), reduction="none"),
        rtol=1e-5,
        atol=1e-5,
    )
