"""Triton expert kernels vs the float64 PyTorch reference, on CPU under TRITON_INTERPRET=1.

Fresh random inputs each test; group sizes include 0, 1 and sizes not divisible by the
tile (16 under the interpreter); feature sizes not divisible by the tile either.
"""

import copy

import pytest
import torch

from helpers.timeouts import limit
from helpers.triton_device import DEV  # first: picks the interpreter on a CPU-only machine
from moeflow.kernels import ops  # noqa: E402
from moeflow.moe.dispatch import DispatchPlan, combine  # noqa: E402
from moeflow.moe.experts import GroupedExperts, expert_mlp, torch_loop  # noqa: E402

# Triton's CPU interpreter computes bf16 dots wrongly (numpy has no bf16): fp16 there, bf16 on the GPU
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float16


def make_plan(T, counts, gen, unrouted=2):
    """Assignments with exactly counts[e] distinct tokens per expert, sorted by expert.

    The last `unrouted` tokens are never routed, so every check also sees rows that must stay zero."""
    token, expert = [], []
    for e, c in enumerate(counts):
        token.append(torch.randperm(T - unrouted, generator=gen)[:c])
        expert.append(torch.full((c,), e))
    token_A = torch.cat(token).to(DEV)
    expert_A = torch.cat(expert).to(DEV)
    weight_A = torch.rand(len(token_A), generator=gen).to(DEV)
    return DispatchPlan(token_A, weight_A, expert_A, torch.tensor(counts, device=DEV), T)


def reference(x, w1, w3, w2, plan):
    """Float64 per-expert loop + combine."""
    xa = x.double()[plan.token_A]
    outs = []
    for e, rows in enumerate(torch.split(xa, plan.counts_E.tolist())):
        outs.append(expert_mlp(rows, w1[e].double(), None if w3 is None else w3[e].double(), w2[e].double()))
    y = torch.cat(outs)
    return combine(y, DispatchPlan(plan.token_A, plan.weight_A.double(), plan.expert_A, plan.counts_E, plan.num_tokens))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def weights(E, D, F, swiglu, dtype, gen):
    w = lambda *s: (torch.randn(*s, generator=gen) * 0.3).to(DEV, dtype).requires_grad_()  # noqa: E731
    return w(E, D, F), (w(E, D, F) if swiglu else None), w(E, F, D)


@pytest.mark.parametrize(
    "activation,rows", [("swiglu", "copied"), ("swiglu", "aligned"), ("gelu", "aligned"), ("swiglu", "gathered")]
)
def test_routed_forward_backward_matches_float64(monkeypatch, activation, rows):
    """Routed rows copied into expert order, copied into the aligned layout (zero pad rows; forced
    here, these groups are small), or read through token_A inside the GEMMs."""
    gather_rows = rows == "gathered"
    monkeypatch.setattr(ops, "ALIGN_FROM_ROWS_PER_EXPERT", 0 if rows == "aligned" else 10**9)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    T, D, F = 40, 24, 40  # D, F not multiples of the 16-wide tile
    counts = [0, 1, 17, 33, 16]  # empty, single row, 17 = tile + 1
    E = len(counts)
    dtype = DTYPE
    plan = make_plan(T, counts, gen)
    plan.weight_A.requires_grad_()
    x = torch.randn(T, D, generator=gen).to(DEV, dtype).requires_grad_()
    w1, w3, w2 = weights(E, D, F, activation == "swiglu", dtype, gen)
    dy = torch.randn(T, D, generator=gen).to(DEV, dtype)

    y = ops.expert_mlp_routed(x, w1, w3, w2, plan.counts_E, plan.token_A, plan.weight_A, gather_rows=gather_rows)
    params = [x, w1, w2, plan.weight_A] + ([w3] if w3 is not None else [])
    grads = torch.autograd.grad(y, params, dy)

    leaves = [p.detach().double().requires_grad_() for p in params]
    xr, w1r, w2r, wr = leaves[:4]
    w3r = leaves[4] if w3 is not None else None
    ref_plan = DispatchPlan(plan.token_A, wr, plan.expert_A, plan.counts_E, T)
    yr = reference(xr, w1r, w3r, w2r, ref_plan)
    refs = torch.autograd.grad(yr, leaves, dy.double())

    assert y.dtype == dtype and y.shape == (T, D)
    assert rel(y, yr) < 1e-2
    unrouted = torch.ones(T, dtype=torch.bool, device=DEV)
    unrouted[plan.token_A] = False
    assert unrouted.any() and (y[unrouted] == 0).all()  # rows not routed get exact zeros
    for name, g, r in zip(["x", "w1", "w2", "weight", "w3"], grads, refs):
        assert torch.isfinite(g).all(), name
        assert rel(g, r) < 1.5e-2, (name, rel(g, r))
    assert (grads[1][0] == 0).all() and (grads[2][0] == 0).all()  # empty expert: exact zero grads


def test_grouped_forward_backward_and_every_output_written():
    """Unrouted path (rows already grouped, as the expert-parallel dispatcher sends them)."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    counts = [5, 0, 1, 18]
    A, D, F, E = sum(counts), 32, 24, len(counts)
    dtype = torch.float16
    x = torch.randn(A, D, generator=gen).to(DEV, dtype).requires_grad_()
    w1, w3, w2 = weights(E, D, F, True, dtype, gen)
    counts_E = torch.tensor(counts, device=DEV)
    # poison: every output buffer the kernels allocate starts as NaN
    orig_empty = torch.Tensor.new_empty

    def poisoned(self, *size, **kw):
        return (
            orig_empty(self, *size, **kw).fill_(float("nan"))
            if self.is_floating_point()
            else orig_empty(self, *size, **kw)
        )

    torch.Tensor.new_empty = poisoned
    try:
        y = ops.expert_mlp(x, w1, w3, w2, counts_E)
        grads = torch.autograd.grad(y, [x, w1, w3, w2], torch.randn(A, D, generator=gen).to(DEV, dtype))
    finally:
        torch.Tensor.new_empty = orig_empty
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    ref = torch.cat(
        [
            expert_mlp(r.double(), w1[e].double(), w3[e].double(), w2[e].double())
            for e, r in enumerate(torch.split(x.double(), counts))
        ]
    )
    assert rel(y, ref) < 1e-2


@pytest.mark.parametrize("routed", [True, False])
def test_forward_without_grad_matches_forward_with_grad(routed):
    """Evaluation (no saved activations) takes other outputs of the custom op: same y."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    T, D, F, counts = 20, 16, 32, [7, 0, 12, 11]
    plan = make_plan(T, counts, gen)
    x = torch.randn(T if routed else sum(counts), D, generator=gen).to(DEV, DTYPE).requires_grad_()
    w1, w3, w2 = weights(len(counts), D, F, True, DTYPE, gen)
    if routed:
        run = lambda: ops.expert_mlp_routed(x, w1, w3, w2, plan.counts_E, plan.token_A, plan.weight_A)  # noqa: E731
    else:
        run = lambda: ops.expert_mlp(x, w1, w3, w2, plan.counts_E)  # noqa: E731
    y = run()
    with torch.no_grad():
        y_eval = run()
    assert torch.equal(y.detach(), y_eval)


def test_deterministic():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    T, D, F, counts = 20, 16, 32, [7, 0, 12, 11]
    plan = make_plan(T, counts, gen)
    x = torch.randn(T, D, generator=gen).to(DEV, DTYPE).requires_grad_()
    w1, w3, w2 = weights(len(counts), D, F, True, DTYPE, gen)
    runs = []
    for _ in range(2):
        y = ops.expert_mlp_routed(x, w1, w3, w2, plan.counts_E, plan.token_A, plan.weight_A)
        runs.append([y] + list(torch.autograd.grad(y.float().square().sum(), [x, w1, w3, w2])))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("routed", [True, False])
def test_tma_loads_equal_pointer_loads_bitwise(monkeypatch, routed):
    """TMA boxes read past an expert's rows (masked on store, or cancelled by the other operand's
    zeroed rows): the results must still equal the pointer-load path (bit for bit at one tile shape)."""
    from moeflow.kernels import tma

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    T, D, F, counts = 40, 32, 40, [9, 0, 1, 17, 3]  # K = 40 is no multiple of the tile: mixed TMA/pointer reads
    plan = make_plan(T, counts, gen)
    x = torch.randn(T if routed else sum(counts), D, generator=gen).to(DEV, DTYPE).requires_grad_()
    w1, w3, w2 = weights(len(counts), D, F, True, DTYPE, gen)
    assert tma.rows_desc(x.detach()) is not None and tma.weight_desc(w1.detach()) is not None  # TMA really used
    monkeypatch.setattr(ops, "ALIGN_FROM_ROWS_PER_EXPERT", 0)  # the aligned layout: weight gradients all TMA
    runs = []
    for use_tma in (True, False):
        monkeypatch.setattr(tma, "USE_TMA", use_tma)
        if routed:
            y = ops.expert_mlp_routed(x, w1, w3, w2, plan.counts_E, plan.token_A, plan.weight_A)
        else:
            y = ops.expert_mlp(x, w1, w3, w2, plan.counts_E)
        runs.append([y] + list(torch.autograd.grad(y.float().square().sum(), [x, w1, w3, w2])))
    for a, b in zip(*runs):
        if DEV == "cpu":
            assert torch.equal(a, b)
        else:  # the autotuner may pick other tiles (another summation order) for each path
            assert rel(a, b) < 1e-2


def test_unaligned_rows_fall_back_to_pointer_loads():
    """TMA needs 16-byte row strides; D = 20 halves (40 bytes) must take the pointer path and stay right."""
    from moeflow.kernels import tma

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    counts = [3, 0, 6]
    x = torch.randn(sum(counts), 20, generator=gen).to(DEV, DTYPE).requires_grad_()
    w1, w3, w2 = weights(len(counts), 20, 24, True, DTYPE, gen)
    assert tma.rows_desc(x.detach()) is None and tma.weight_desc(w2.detach()) is None
    y = ops.expert_mlp(x, w1, w3, w2, torch.tensor(counts, device=DEV))
    ref = torch.cat(
        [
            expert_mlp(r.double(), w1[e].double(), w3[e].double(), w2[e].double())
            for e, r in enumerate(torch.split(x.double(), counts))
        ]
    )
    assert rel(y, ref) < 1e-2


def test_grouped_experts_module_uses_fused_path_and_matches_torch_impl():
    torch.manual_seed(torch.seed() % 2**31)
    ex = GroupedExperts(4, 16, 24, "swiglu", impl="triton").to(DEV)
    assert ex.fuses_permute and not GroupedExperts(4, 16, 24, impl="torch").fuses_permute
    assert not GroupedExperts(4, 16, 24, impl="triton", bias=True).fuses_permute  # biases: reference path only
    plan = make_plan(12, [3, 0, 9, 1], torch.Generator().manual_seed(1))
    x = torch.randn(12, 16, device=DEV)
    with torch.autocast(DEV, dtype=DTYPE):
        y = ex.forward_routed(x, plan)
        y_rows = ex(x[plan.token_A], plan.counts_E)
    ref = combine(
        torch_loop(copy.deepcopy(ex).double(), x.double()[plan.token_A], plan.counts_E),
        DispatchPlan(plan.token_A, plan.weight_A.double(), plan.expert_A, plan.counts_E, 12),
    )
    assert y.dtype == DTYPE and rel(y, ref) < 1e-2
    assert rel(combine(y_rows.float(), plan), ref) < 1e-2


def test_bad_input_is_rejected_or_falls_back():
    ex = GroupedExperts(2, 16, 24, "swiglu", impl="triton").to(DEV)
    x = torch.randn(5, 16, device=DEV)
    counts = torch.tensor([2, 3], device=DEV)
    with pytest.warns(RuntimeWarning, match="falling back"):  # fp32 without autocast: reference path
        y = ex(x, counts)
    assert torch.allclose(y, torch_loop(ex, x, counts))
    # rows past the groups (a worst-case receive buffer's tail) are ignored: the reference gives them zeros
    y_short = ex(x, torch.tensor([2, 2], device=DEV))  # (the fallback warned once above)
    assert torch.allclose(y_short[:4], torch_loop(ex, x[:4], torch.tensor([2, 2], device=DEV))) and not y_short[4].any()
    if DEV == "cpu":  # more rows claimed than given is refused where checking costs no host sync
        with pytest.raises(ValueError, match="sums to 6 but x_AD has only 5 rows"):
            ex(x, torch.tensor([3, 3], device=DEV))
    xb, w = x.to(DTYPE), ex.w1_EDF.detach().to(DTYPE)
    with pytest.raises(ops.UnsupportedInput, match="shape mismatch"):
        ops.expert_mlp(xb, w, w, w, counts)
    with pytest.raises(ops.UnsupportedInput, match="dtype"):
        ops.expert_mlp(xb, w.float(), None, w.transpose(1, 2).float(), counts)
    with pytest.raises(ops.UnsupportedInput, match="unit stride"):
        ops.expert_mlp(torch.randn(16, 5, device=DEV).to(DTYPE).t(), w, w, w.transpose(1, 2).contiguous(), counts)


def test_second_backward_is_refused():
    """Backward reuses the saved activations in place, so a retained graph must not run twice."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(6, 16, generator=gen).to(DEV, DTYPE).requires_grad_()
    w1, w3, w2 = weights(2, 16, 16, True, DTYPE, gen)
    y = ops.expert_mlp(x, w1, w3, w2, torch.tensor([2, 4], device=DEV))
    y.float().sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        y.float().sum().backward()


@pytest.mark.parametrize("swiglu", [True, False])
def test_compiled_backward_writes_new_buffers_and_matches_eager(monkeypatch, swiglu):
    """Traced by torch.compile, the backward must not write into its saved h1/h3: Inductor copies
    any saved tensor that an op mutates (two A x F copies per layer). Gradients equal eager's exactly.
    (Rows copied unaligned: Dynamo cannot trace the aligned layout's kernel under the CPU interpreter.)"""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    monkeypatch.setattr(ops, "ALIGN_FROM_ROWS_PER_EXPERT", 10**9)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    T, D, F, counts = 24, 16, 24, [5, 0, 17, 9]
    plan = make_plan(T, counts, gen)
    x = torch.randn(T, D, generator=gen).to(DEV, DTYPE).requires_grad_()
    w1, w3, w2 = weights(len(counts), D, F, swiglu, DTYPE, gen)
    weight_A = plan.weight_A.to(DTYPE).requires_grad_()
    dy = torch.randn(T, D, generator=gen).to(DEV, DTYPE)
    params = [x, w1, w2, weight_A] + ([w3] if swiglu else [])

    def step(x, w1, w2, weight_A, w3=None):
        return ops.expert_mlp_routed(x, w1, w3, w2, plan.counts_E, plan.token_A, weight_A)

    backward_graphs = []

    def keep_backward(gm, example_inputs):
        backward_graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=keep_backward)
    compiled = torch.compile(
        step, backend=backend
    )  # (the aligned layout's kernel breaks the graph under the interpreter)
    got = torch.autograd.grad(compiled(*params), params, dy)
    want = torch.autograd.grad(step(*params), params, dy)
    torch._dynamo.reset()

    targets = [str(n.target) for gm in backward_graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert any("experts_bwd_fresh" in t for t in targets), targets
    assert not any("auto_functionalized" in t for t in targets), targets  # no in-place op left to copy for
    for name, g, w in zip(["x", "w1", "w2", "weight", "w3"], got, want):
        assert torch.equal(g, w), name


def test_registration_is_lazy_and_auto_picks_triton_on_cuda():
    import subprocess
    import sys

    from moeflow.launch.config import resolve_experts_impl
    from moeflow.moe.experts import IMPLEMENTATIONS

    assert "triton" in IMPLEMENTATIONS
    assert resolve_experts_impl("auto", torch.device("cuda")) == "triton"
    assert resolve_experts_impl("auto", torch.device("cpu")) == "torch"
    code = (
        "import sys, moeflow.moe.model, moeflow.moe.experts; assert 'triton' not in sys.modules, 'moe imported triton'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=limit(120))


def test_gather_rows_reaches_every_moe_layer_from_the_config():
    from helpers.config import TINY, compose_cfg
    from moeflow.launch.config import model_config
    from moeflow.launch.upcycle.outputs import model_yaml
    from moeflow.moe.model import Transformer

    for flag in (False, True):
        mc = model_config(compose_cfg(*TINY, f"experts.gather_rows={str(flag).lower()}"), torch.device("cpu"))
        layers = [m for m in Transformer(mc).modules() if isinstance(m, GroupedExperts)]
        assert layers and all(m.gather_rows is flag for m in layers)
        assert "gather_rows" not in model_yaml(mc.to_dict())  # an experts.* key, not a model.* one


@pytest.mark.parametrize("capacity", [False, True])
def test_token_order_from_a_token_major_gate_gives_a_valid_layout(capacity):
    """Top-k routing is token-major, so the plan's token_order_A replaces the layout's sort:
    it must place every row inside its token's segment, as a permutation, and give the same
    experts output and gradients as the sorted layout."""
    from moeflow.moe.dispatch import plan_dispatch
    from moeflow.moe.gates.topk import TopKGate

    torch.manual_seed(torch.seed() % 2**31)
    T, D, F, E, k = 24, 16, 24, 4, 2
    gate = TopKGate(D, E, top_k=k, dropless=not capacity, capacity_factor=0.75 if capacity else None).to(DEV)
    x = torch.randn(T, D, device=DEV)
    routing = gate(x)
    assert routing.token_sorted and bool((routing.token_A[1:] >= routing.token_A[:-1]).all())
    plan = plan_dispatch(routing)
    assert plan.token_order_A is not None
    A = plan.token_A.numel()
    for order in (None, plan.token_order_A):
        pos, offs = ops.routing_layout(plan.token_A, T, order)
        assert torch.equal(pos.sort().values.long(), torch.arange(A, device=DEV))
        assert bool(((offs[plan.token_A] <= pos) & (pos < offs[plan.token_A + 1])).all())
    xb = x.to(DTYPE).requires_grad_()
    w1, w3, w2 = weights(E, D, F, True, DTYPE, torch.Generator().manual_seed(torch.seed() % 2**31))
    dy = torch.randn(T, D, device=DEV).to(DTYPE)
    outs = []
    for order in (None, plan.token_order_A):
        y = ops.expert_mlp_routed(xb, w1, w3, w2, plan.counts_E, plan.token_A, plan.weight_A.detach(), order)
        outs.append([y] + list(torch.autograd.grad(y, [xb, w1, w3, w2], dy)))
    for a, b in zip(*outs):
        assert rel(a, b) < 1e-3  # only the order of each token's k-row sum differs


def test_aligned_layout_pads_each_group_with_rows_that_point_nowhere():
    """Groups start on multiples of ROW_ALIGN, keep their rows in order, and pad rows carry token -1,
    position -1 and weight 0; the weight gradient flows back to the real rows only."""
    from moeflow.kernels import autotune

    align = autotune.ROW_ALIGN
    counts = torch.tensor([0, 1, align - 1, align, align + 1, 3])
    A, E = int(counts.sum()), len(counts)
    token_A = torch.randint(0, 50, (A,))
    pos_A = torch.randperm(A)
    weight_A = torch.rand(A, requires_grad=True)
    outs = ops.aligned_layout(counts.to(DEV), token_A.to(DEV), weight_A.to(DEV), pos_A.to(DEV))
    counts_P, token_P, weight_P, pos_P, expert_row_A = (t.cpu() for t in outs)  # weight_P stays differentiable
    assert counts_P.tolist() == [0, align, align, align, 2 * align, align]
    assert token_P.shape[0] == A + (align - 1) * E >= int(counts_P.sum())
    start = first = 0  # group start in the padded / unpadded rows
    for c, cp in zip(counts.tolist(), counts_P.tolist()):
        assert start % align == 0
        real = slice(start, start + c)
        assert torch.equal(token_P[real].long(), token_A[first : first + c]) and torch.equal(
            pos_P[real].long(), pos_A[first : first + c]
        )
        assert torch.equal(weight_P[real], weight_A[first : first + c])
        assert (token_P[start + c : start + cp] == -1).all() and (pos_P[start + c : start + cp] == -1).all()
        assert (weight_P[start + c : start + cp] == 0).all()
        start, first = start + cp, first + c
    assert (token_P[start:] == -1).all() and (pos_P[start:] == -1).all()
    # expert_row_A: the padded row of each assignment in token-sorted order (fan_out's destinations)
    assert torch.equal(pos_P[expert_row_A.long()].long(), torch.arange(A))
    assert torch.equal(token_P[expert_row_A[pos_A].long()].long(), token_A)
    g = torch.randn(weight_P.shape[0])
    (grad,) = torch.autograd.grad((weight_P * g).sum(), weight_A)
    assert torch.equal(grad, g[token_P >= 0])


@pytest.mark.parametrize("aligned", [False, True])
def test_fan_out_copies_each_token_row_to_its_rows(aligned):
    """fan_out == src[idx] (zeros on the pad rows inside aligned groups), for tokens with 0, 1 or
    several rows and destinations in any order."""
    from moeflow.kernels import permute

    T, D = 9, 40  # D not a multiple of the interpreter's 16-column block
    src = torch.randn(T, D).to(DEV, DTYPE)
    per_token = torch.tensor([2, 0, 3, 1, 1, 2, 0, 4, 1])
    token_Q = torch.repeat_interleave(torch.arange(T), per_token)  # assignments in token order
    A = token_Q.shape[0]
    order = torch.randperm(A)  # expert-sorted row a holds token-sorted assignment order[a]
    counts = torch.tensor([5, 0, 1, A - 6])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(per_token, 0)]).to(DEV, torch.int32)
    if aligned:
        counts_P, idx, _, _, dest = ops.aligned_layout(
            counts.to(DEV), token_Q[order].to(DEV), torch.rand(A, device=DEV), order.to(DEV)
        )
        out = torch.full(
            (idx.shape[0], D), float("nan"), dtype=DTYPE, device=DEV
        )  # poisoned: every row must be written
        permute.fan_out(src, offsets, dest, idx.shape[0], (idx, counts_P), out=out)
        rows = int(counts_P.sum())  # rows past the last group are left unwritten
    else:
        idx, dest = token_Q[order], torch.empty_like(order).scatter_(0, order, torch.arange(A))
        out = permute.fan_out(
            src, offsets, dest.to(DEV, torch.int32), A, out=torch.full((A, D), float("nan"), dtype=DTYPE, device=DEV)
        )
        rows = A
    idx = idx[:rows].long().to(DEV)
    ref = torch.where((idx >= 0)[:, None], src[idx.clamp_min(0)], torch.zeros((), dtype=DTYPE, device=DEV))
    assert (idx < 0).any() == aligned
    assert torch.equal(out[:rows], ref)


def test_aligned_layout_only_for_groups_large_enough(monkeypatch):
    """Padding 4-row groups to 64 would multiply the rows: small groups keep the unpadded copy."""
    calls = []
    real = ops.aligned_layout
    monkeypatch.setattr(ops, "aligned_layout", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    counts = [5, 3, 0, 8]
    plan = make_plan(12, counts, gen)
    x = torch.randn(12, 16, generator=gen).to(DEV, DTYPE)
    w1, w3, w2 = weights(len(counts), 16, 16, True, DTYPE, gen)
    ys = []
    for threshold, padded in ((sum(counts) // len(counts) + 1, False), (sum(counts) // len(counts), True)):
        monkeypatch.setattr(ops, "ALIGN_FROM_ROWS_PER_EXPERT", threshold)
        calls.clear()
        with torch.no_grad():
            ys.append(ops.expert_mlp_routed(x, w1, w3, w2, plan.counts_E, plan.token_A, plan.weight_A))
        assert bool(calls) == padded
    assert rel(ys[0], ys[1]) < 1e-3


@pytest.mark.parametrize("T, D, k", [(7, 40, 3), (33, 16, 1)])
def test_gather_sum_combine_matches_float64_scatter_add(T, D, k):
    """kernels.combine.gather_sum (dispatch.combine on CUDA) = the weighted index_add, values and
    gradients of rows and weights; tokens with no rows get 0, rows arrive in a shuffled order."""
    from moeflow.kernels.combine import gather_sum

    gen = torch.Generator().manual_seed(T * D + k)
    token_A = torch.arange(T - 2).repeat_interleave(k)  # the last two tokens: no rows
    token_A = token_A[torch.randperm(token_A.shape[0], generator=gen)].to(DEV)
    A = token_A.shape[0]
    y = torch.randn(A, D, generator=gen).to(DEV, DTYPE).requires_grad_()
    w = torch.rand(A, generator=gen).to(DEV).requires_grad_()
    g = torch.randn(T, D, generator=gen).to(DEV, DTYPE)
    out = gather_sum(y, w, token_A, T)
    out.backward(g)
    y64, w64 = y.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.zeros(T, D, dtype=torch.float64, device=DEV).index_add(0, token_A, y64 * w64[:, None])
    ref.backward(g.double())
    tol = 2e-2 if DTYPE == torch.bfloat16 else 2e-3
    assert out.dtype == y.dtype and torch.equal(out[-2:], torch.zeros_like(out[-2:]))
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(y.grad.double(), y64.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=tol * 4, rtol=tol)
